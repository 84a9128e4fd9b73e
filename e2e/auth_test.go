package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/lab"
)

// TestAuthenticatedLink: with the same --key-file on both agents the
// guest is protected; with different keys the backup refuses the primary
// before using anything it sent, no epoch commits and nothing fails over.
func TestAuthenticatedLink(t *testing.T) {
	for _, tc := range []struct {
		name         string
		primary, bak string
	}{
		{"same key", "key one: 32 bytes of shared key!", "key one: 32 bytes of shared key!"},
		{"wrong key", "key one: 32 bytes of shared key!", "key two: 32 bytes of other key!!"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			g := bootPrimary(t, l, ctx, 4000)
			pk, bk := filepath.Join(l.Dir, "primary.key"), filepath.Join(l.Dir, "backup.key")
			if err := os.WriteFile(pk, []byte(tc.primary), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(bk, []byte(tc.bak), 0o600); err != nil {
				t.Fatal(err)
			}
			p, err := l.Protect(g.prim, g.back, lab.ProtectOptions{HeartbeatTimeout: heartbeatTimeout,
				PrimaryArgs: []string{"--key-file", pk}, BackupArgs: []string{"--key-file", bk}})
			if err != nil {
				t.Fatal(err)
			}
			dump(t, l, p)
			if tc.primary == tc.bak {
				eps, err := p.WaitCommitted(ctx, 5)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("authenticated link: %d epochs committed", len(eps))
				return
			}
			line, err := p.Backup.WaitLine(ctx, "refused a connection")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(line, "authentication failed") {
				t.Errorf("the backup's refusal does not say why: %s", line)
			}
			if _, err := p.Primary.WaitLine(ctx, "protection lost"); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(p.Primary.Output(), "authentication failed") {
				t.Errorf("the primary was not told that authentication failed")
			}
			time.Sleep(2 * time.Second) // the primary retries meanwhile
			if eps, _ := p.Epochs(); len(eps) != 0 {
				t.Fatalf("%d epochs committed over a link with the wrong key", len(eps))
			}
			if _, err := os.Stat(p.Report); err == nil {
				t.Fatal("the backup failed over")
			}
		})
	}
}
