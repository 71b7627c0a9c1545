package caddymodule

import "syscall"

// demoChildAttr makes a demo node die with the `caddy circle demo` process
// even when that process cannot clean up (SIGKILL, a closed terminal), so
// no node is left holding the demo's ports.
func demoChildAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
