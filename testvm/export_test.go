package testvm

// NewVMForConsole is a VM whose console is the file log and whose QEMU never
// exits, for tests of the console helpers.
func NewVMForConsole(log string) *VM {
	return &VM{Config: Config{SerialLog: log}, done: make(chan struct{})}
}
