package relay

// AllowLoopback lets a test server relay to loopback peers (every test node
// is on 127.0.0.1).
func (s *Server) AllowLoopback() { s.allowLoopback.Store(true) }

// Allowed exposes the permission decision.
func (s *Server) Allowed(ip []byte) bool { return s.allowed(ip) }
