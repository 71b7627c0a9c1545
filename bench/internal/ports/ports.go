// Package ports finds free loopback ports for the benchmark programs.
package ports

import (
	"fmt"
	"net"
)

// Free returns a loopback port that is free for both TCP and UDP (a
// replicator binds its gossip port on both).
func Free() (int, error) {
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		l.Close()
		if err == nil {
			u.Close()
			return port, nil
		}
	}
	return 0, fmt.Errorf("no free port")
}
