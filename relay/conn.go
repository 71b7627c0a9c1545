package relay

import (
	"net"
	"sort"
	"sync"

	"github.com/quic-go/quic-go"
)

// streamConn is a mesh stream as a net.Conn.
type streamConn struct {
	*quic.Stream
	peer          string // the peer's node name
	local, remote net.Addr
	once          sync.Once
}

func (m *Mesh) streamConn(mc *meshConn, s *quic.Stream) *streamConn {
	return &streamConn{Stream: s, peer: mc.peer, local: m.advertise, remote: mc.from()}
}

func (c *streamConn) LocalAddr() net.Addr  { return c.local }
func (c *streamConn) RemoteAddr() net.Addr { return c.remote }

// CloseWrite half-closes the stream: it sends FIN and keeps reading until
// the peer's FIN (or Close).
func (c *streamConn) CloseWrite() error { return c.Stream.Close() }

// Close ends both directions: it sends FIN and stops reading.
func (c *streamConn) Close() error {
	var err error
	c.once.Do(func() {
		err = c.Stream.Close()
		c.Stream.CancelRead(0)
	})
	return err
}

// serviceListener is a net.Listener over a mesh service.
type serviceListener struct {
	m       *Mesh
	service string
	entry   *meshService
	ch      chan net.Conn
	done    chan struct{}
	once    sync.Once
}

// handle is the service handler: it passes the conn to Accept, or closes
// it if the listener or the mesh closes first.
func (l *serviceListener) handle(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		c.Close()
	case <-l.m.ctx.Done():
		c.Close()
	}
}

func (l *serviceListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	case <-l.m.ctx.Done():
		return nil, net.ErrClosed
	}
}

func (l *serviceListener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.m.mu.Lock()
		defer l.m.mu.Unlock()
		if l.m.services[l.service] == l.entry {
			delete(l.m.services, l.service)
		}
	})
	return nil
}

func (l *serviceListener) Addr() net.Addr { return l.m.advertise }

func sortPaths(p []PathInfo) {
	sort.Slice(p, func(i, j int) bool {
		if p[i].Peer != p[j].Peer {
			return p[i].Peer < p[j].Peer
		}
		return p[i].Since.Before(p[j].Since)
	})
}
