package relay

// AllowLoopback lets a test server relay to loopback peers (every test node
// is on 127.0.0.1).
func (s *Server) AllowLoopback() { s.allowLoopback.Store(true) }

// Allowed exposes the permission decision.
func (s *Server) Allowed(ip []byte) bool { return s.allowed(ip) }

// HelloFrom reports whether a live connection to peer has received the
// peer's hello (so its incarnation is known).
func (m *Mesh) HelloFrom(peer string) bool {
	m.mu.Lock()
	conns := append([]*meshConn(nil), m.conns[peer]...)
	m.mu.Unlock()
	for _, mc := range conns {
		mc.mu.Lock()
		ok := mc.hello
		mc.mu.Unlock()
		if ok {
			return true
		}
	}
	return false
}
