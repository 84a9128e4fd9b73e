package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/urfave/cli/v2"
)

// TestDaemonConfigFile reads the example configuration the install target
// ships, and a file that sets what the command line does not.
func TestDaemonConfigFile(t *testing.T) {
	run := func(args ...string) *cli.Context {
		t.Helper()
		cmd := daemonCommand()
		var got *cli.Context
		cmd.Action = func(c *cli.Context) error { got = c; return nil }
		app := &cli.App{Name: "remusd", Commands: []*cli.Command{cmd}}
		if err := app.Run(append([]string{"remusd", "daemon"}, args...)); err != nil {
			t.Fatalf("remusd daemon %v: %v", args, err)
		}
		return got
	}
	c := run("--config", "../../packaging/remusd.toml")
	if c.String("key-file") != "/etc/remus/key" || c.String("listen") != ":7790" || c.String("agent-ports") != "7800-7899" {
		t.Errorf("example configuration: key-file %q listen %q agent-ports %q", c.String("key-file"), c.String("listen"), c.String("agent-ports"))
	}
	if w := c.StringSlice("witness"); len(w) != 1 || w[0] != "http://witness.example:2379" {
		t.Errorf("example configuration: witness %q", w)
	}

	conf := filepath.Join(t.TempDir(), "remusd.toml")
	if err := os.WriteFile(conf, []byte("listen = \"10.0.0.1:7790\"\nassume-fail-stop = true\nheartbeat-timeout = \"3s\"\nstandby-name = \"{name}-sb\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c = run("--config", conf, "--listen", ":9000")
	if c.String("listen") != ":9000" {
		t.Errorf("the command line's --listen lost to the file's: %q", c.String("listen"))
	}
	if !c.Bool("assume-fail-stop") || c.Duration("heartbeat-timeout").String() != "3s" || c.String("standby-name") != "{name}-sb" {
		t.Errorf("from the file: assume-fail-stop %v heartbeat-timeout %v standby-name %q", c.Bool("assume-fail-stop"), c.Duration("heartbeat-timeout"), c.String("standby-name"))
	}
	// The default file may be missing; a named one may not.
	if err := (&cli.App{Name: "remusd", Commands: []*cli.Command{daemonCommand()}}).Run([]string{"remusd", "daemon", "--config", filepath.Join(t.TempDir(), "missing.toml")}); err == nil {
		t.Error("a missing --config file was no error")
	}
}
