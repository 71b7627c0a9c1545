package relay

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// MemberlistService is the mesh service carrying memberlist's streams
// (and, through them, the replicator's, which share memberlist's
// transport).
const MemberlistService = "memberlist"

// autoConnectBackoff spaces automatic connection attempts to one peer.
const autoConnectBackoff = time.Second

// Transport is a memberlist.NodeAwareTransport over a Mesh: memberlist
// packets travel as QUIC datagrams (or a unidirectional stream when too
// large), its streams as mesh streams of MemberlistService. Destinations
// are routed by node name; an address without a name is looked up among
// the addresses peers advertised or were dialed at. When no connection to
// the destination exists the transport dials its address over the mesh's
// socket (streams wait for it; packets go once it is up, in the
// background), so a node that cannot be dialed (behind NAT, or on a relay
// without a permission for us) must connect to us first.
type Transport struct {
	m       *Mesh
	packets chan *memberlist.Packet
	streams chan net.Conn
	done    chan struct{}
	once    sync.Once
}

var _ memberlist.NodeAwareTransport = (*Transport)(nil)

// Transport returns the mesh's memberlist transport, registering the
// memberlist service. A mesh has at most one live Transport; Shutdown
// releases it (the mesh stays up).
func (m *Mesh) Transport() (*Transport, error) {
	t := &Transport{
		m:       m,
		packets: make(chan *memberlist.Packet, 256),
		streams: make(chan net.Conn),
		done:    make(chan struct{}),
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	if m.packets != nil || m.services[MemberlistService] != nil {
		return nil, fmt.Errorf("%w: the mesh already has a memberlist transport", ErrInvalid)
	}
	m.packets = t.deliver
	m.services[MemberlistService] = &meshService{h: t.handleStream}
	return t, nil
}

func (t *Transport) deliver(from net.Addr, b []byte) {
	p := &memberlist.Packet{Buf: append([]byte(nil), b...), From: from, Timestamp: time.Now()}
	select {
	case t.packets <- p:
	case <-t.done:
	case <-t.m.ctx.Done():
	}
}

func (t *Transport) handleStream(c net.Conn) {
	select {
	case t.streams <- c:
	case <-t.done:
		c.Close()
	case <-t.m.ctx.Done():
		c.Close()
	}
}

// FinalAdvertiseAddr implements memberlist.Transport: the mesh's
// advertised address, unless memberlist was given one explicitly.
func (t *Transport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	if ip != "" {
		if p := net.ParseIP(ip); p != nil {
			return p, port, nil
		}
		return nil, 0, fmt.Errorf("%w: advertise address %q", ErrInvalid, ip)
	}
	return t.m.advertise.IP, t.m.advertise.Port, nil
}

// PacketCh implements memberlist.Transport.
func (t *Transport) PacketCh() <-chan *memberlist.Packet { return t.packets }

// StreamCh implements memberlist.Transport.
func (t *Transport) StreamCh() <-chan net.Conn { return t.streams }

// WriteTo implements memberlist.Transport.
func (t *Transport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

// WriteToAddress implements memberlist.NodeAwareTransport. Like UDP, a
// packet to a peer without a connection is not an error: it is sent after
// a background connection attempt succeeds, or dropped.
func (t *Transport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	now := time.Now()
	name := t.name(a)
	if name != "" && t.m.best(name) != nil {
		return now, t.m.SendPacket(name, b)
	}
	if !t.m.startDialing(name, a.Addr) {
		return now, nil
	}
	msg := append([]byte(nil), b...)
	t.m.goTracked(func() {
		defer t.m.doneDialing(name, a.Addr)
		addr, err := net.ResolveUDPAddr("udp", a.Addr)
		if err != nil {
			return
		}
		mc, err := t.m.connect(t.m.ctx, name, addr, t.m.primary, "", "")
		if err != nil {
			t.m.log.Debug("mesh: automatic connect failed", "peer", a.String(), "err", err)
			return
		}
		t.m.SendPacket(mc.peer, msg)
	})
	return now, nil
}

// DialTimeout implements memberlist.Transport.
func (t *Transport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

// DialAddressTimeout implements memberlist.NodeAwareTransport: it opens a
// MemberlistService stream to the node, connecting first if needed.
// Shutdown ends a dial in flight.
func (t *Transport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	select {
	case <-t.done:
		return nil, ErrClosed
	default:
	}
	ctx, cancel := context.WithTimeout(t.m.ctx, timeout)
	defer cancel()
	go func() {
		select {
		case <-t.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	name := t.name(a)
	if name == "" || t.m.best(name) == nil {
		addr, err := net.ResolveUDPAddr("udp", a.Addr)
		if err != nil {
			return nil, fmt.Errorf("%w: address %q: %w", ErrInvalid, a.Addr, err)
		}
		mc, err := t.m.connect(ctx, name, addr, t.m.primary, "", "")
		if err != nil {
			return nil, err
		}
		name = mc.peer
	}
	return t.m.Dial(ctx, name, MemberlistService)
}

// name resolves a memberlist address to a peer name.
func (t *Transport) name(a memberlist.Address) string {
	if a.Name != "" {
		return a.Name
	}
	return t.m.nameFor(a.Addr)
}

// Shutdown implements memberlist.Transport: it detaches the transport
// from the mesh (which stays up for other services); the mesh's owner
// closes the mesh.
func (t *Transport) Shutdown() error {
	t.once.Do(func() {
		close(t.done)
		t.m.mu.Lock()
		defer t.m.mu.Unlock()
		t.m.packets = nil
		delete(t.m.services, MemberlistService)
	})
	return nil
}

// startDialing reports whether an automatic connection attempt to
// name/addr may start now (none in flight, none in the last
// autoConnectBackoff), and records it.
func (m *Mesh) startDialing(name, addr string) bool {
	key := name + "/" + addr
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false
	}
	if at, ok := m.dialing[key]; ok && (at.IsZero() || time.Since(at) < autoConnectBackoff) {
		return false
	}
	m.dialing[key] = time.Time{} // in flight
	return true
}

// doneDialing records the end of an automatic connection attempt.
func (m *Mesh) doneDialing(name, addr string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dialing[name+"/"+addr] = time.Now()
}
