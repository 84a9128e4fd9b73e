package netns

import "testing"

func TestCheckAddr(t *testing.T) {
	tests := []struct {
		network, addr string
		ok            bool
	}{
		{"tcp", "10.0.0.1:80", true},
		{"tcp4", ":0", true},
		{"tcp6", "[::1]:22", true},
		{"udp", "127.0.0.1:53", true},
		{"tcp", "localhost:80", false},
		{"tcp", "example.com:443", false},
		{"tcp", "10.0.0.1", false},
		{"unix", "/tmp/x.sock", true},
	}
	for _, tt := range tests {
		err := checkAddr(tt.network, tt.addr)
		if (err == nil) != tt.ok {
			t.Errorf("checkAddr(%q, %q) = %v, want ok=%v", tt.network, tt.addr, err, tt.ok)
		}
	}
}
