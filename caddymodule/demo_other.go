//go:build !linux

package caddymodule

import "syscall"

// demoChildAttr: only Linux can tie a child's life to its parent's; on
// other systems Ctrl-C still stops the nodes cleanly.
func demoChildAttr() *syscall.SysProcAttr { return nil }
