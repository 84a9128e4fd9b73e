package agent

import (
	"context"
	"errors"
	"log/slog"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/testenv"
)

// What QEMU 7.2 prints for a q35 guest with its RAM in ram0, a standard
// VGA and a virtio NIC with its option ROM.
const ramblocks = `              Block Name    PSize              Offset               Used              Total
                    ram0    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
   0000:00:01.0/vga.vram    4 KiB  0x0000000008080000 0x0000000001000000 0x0000000001000000
    /rom@etc/acpi/tables    4 KiB  0x0000000009100000 0x0000000000020000 0x0000000000200000
                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000
0000:00:02.0/virtio-net-pci.rom    4 KiB  0x00000000090c0000 0x0000000000040000 0x0000000000040000
                  pc.rom    4 KiB  0x0000000008040000 0x0000000000020000 0x0000000000020000
    0000:00:01.0/vga.rom    4 KiB  0x0000000009080000 0x0000000000010000 0x0000000000010000
   /rom@etc/table-loader    4 KiB  0x0000000009300000 0x0000000000001000 0x0000000000010000
      /rom@etc/acpi/rsdp    4 KiB  0x0000000009340000 0x0000000000001000 0x0000000000001000
`

// The same from QEMU 10.0: two more columns, and \r\n line ends.
const ramblocks10 = "              Block Name    PSize              Offset               Used              Total                HVA  RO\r\n" +
	"                    ram0    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007fa09bfff000  rw\r\n" +
	"   0000:00:01.0/vga.vram    4 KiB  0x0000000008080000 0x0000000001000000 0x0000000001000000 0x00007fa09a000000  rw\r\n" +
	"                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000 0x00007fa0a4a00000  ro\r\n"

func TestUnreplicatedRAM10(t *testing.T) {
	blocks, err := parseRAMBlocks(ramblocks10)
	if err != nil {
		t.Fatal(err)
	}
	if bad := unreplicated(blocks, "ram0"); len(bad) != 1 || bad[0].Name != "0000:00:01.0/vga.vram" {
		t.Fatalf("unreplicated %v, want the VGA's video RAM only", bad)
	}
}

func TestUnreplicatedRAM(t *testing.T) {
	blocks, err := parseRAMBlocks(ramblocks)
	if err != nil {
		t.Fatal(err)
	}
	if len(blocks) != 9 || blocks[0] != (RAMBlock{Name: "ram0", Bytes: 128 << 20}) {
		t.Fatalf("parsed %v", blocks)
	}
	bad := unreplicated(blocks, "ram0")
	if len(bad) != 1 || bad[0].Name != "0000:00:01.0/vga.vram" || bad[0].Bytes != 16<<20 {
		t.Fatalf("unreplicated %v, want the VGA's video RAM only", bad)
	}
	if _, err := parseRAMBlocks("Block Name PSize\n"); err == nil {
		t.Fatal("an empty table was accepted")
	}
	if _, err := parseRAMBlocks(ramblocks + "garbage line\n"); err == nil {
		t.Fatal("a malformed line was accepted")
	}
}

// TestCheckRAMReplicatedWithQEMU asks a real QEMU: a standard VGA's video
// RAM is refused by name, a guest without one is accepted.
func TestCheckRAMReplicatedWithQEMU(t *testing.T) {
	bin := testenv.RequireQEMU(t)
	for _, tc := range []struct {
		vga  string
		want error
	}{{"std", ErrUnreplicatedRAM}, {"none", nil}} {
		t.Run("vga-"+tc.vga, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "qmp.sock")
			cmd := exec.CommandContext(t.Context(), bin, "-accel", "tcg", "-machine", "q35,memory-backend=ram0",
				"-object", "memory-backend-memfd,id=ram0,size=64M,share=on", "-m", "64M", "-nodefaults", "-display", "none",
				"-vga", tc.vga, "-S", "-qmp", "unix:"+sock+",server=on,wait=off")
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			q, err := redial(ctx, 10*time.Millisecond, func(ctx context.Context) (*QEMU, error) {
				return Attach(ctx, sock, slog.New(slog.DiscardHandler))
			})
			if err != nil {
				t.Fatal(err)
			}
			defer q.Mon.Close()
			err = q.CheckRAMReplicated(ctx)
			if !errors.Is(err, tc.want) || (tc.want != nil && !strings.Contains(err.Error(), "vga.vram")) {
				t.Fatalf("CheckRAMReplicated = %v, want %v naming the video RAM", err, tc.want)
			}
		})
	}
}
