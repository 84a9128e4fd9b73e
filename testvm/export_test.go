package testvm

// NewVMForConsole is a VM whose console is the file log and whose QEMU never
// exits, for tests of the console helpers.
func NewVMForConsole(log string) *VM {
	return &VM{Config: Config{SerialLog: log}, done: make(chan struct{})}
}

// BootFirmware exposes the probe's firmware boot, so that a test can check
// the end-of-self-test marker against the real firmware under TCG.
var BootFirmware = bootFirmware

// SetKVMDevice points ChooseAccel's probe at another device file for the
// duration of a test.
func SetKVMDevice(path string) (restore func()) {
	old := kvmDevice
	kvmDevice = path
	return func() { kvmDevice = old }
}
