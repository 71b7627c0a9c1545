package relay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/pion/stun"
)

// ReflexiveTimeout bounds Reflexive, and Mesh.Reflexive when its context
// has no earlier deadline.
const ReflexiveTimeout = 5 * time.Second

// stunRetransmit is the interval between Binding request retransmissions.
const stunRetransmit = 500 * time.Millisecond

// Reflexive asks the STUN server at server (host:port) which address conn's
// packets arrive from: the server-reflexive address, i.e. conn's address on
// the far side of any NAT. It sends a Binding request (retransmitted every
// 500 ms) and waits up to ReflexiveTimeout for the matching response,
// discarding anything else read from conn, so conn must not be read by
// anyone else meanwhile (once a Mesh runs on a socket, use
// Mesh.Reflexive). It leaves conn's read deadline cleared.
func Reflexive(conn net.PacketConn, server string) (netip.AddrPort, error) {
	ctx, cancel := context.WithTimeout(context.Background(), ReflexiveTimeout)
	defer cancel()
	defer conn.SetReadDeadline(time.Time{})
	return stunBinding(ctx, server,
		func(b []byte, to net.Addr) error {
			_, err := conn.WriteTo(b, to)
			return err
		},
		func(ctx context.Context, b []byte) (int, error) {
			dl, _ := ctx.Deadline()
			conn.SetReadDeadline(dl)
			n, _, err := conn.ReadFrom(b)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return 0, context.DeadlineExceeded
			}
			return n, err
		})
}

// stunBinding runs one Binding transaction with write and read (read
// returns a context error when its context ends first).
func stunBinding(ctx context.Context, server string, write func([]byte, net.Addr) error,
	read func(context.Context, []byte) (int, error)) (netip.AddrPort, error) {
	raddr, err := net.ResolveUDPAddr("udp", server)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("relay: stun server %q: %w", server, err)
	}
	req, err := stun.Build(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("relay: building stun request: %w", err)
	}
	buf := make([]byte, 1500)
	for ctx.Err() == nil {
		if err := write(req.Raw, raddr); err != nil {
			return netip.AddrPort{}, fmt.Errorf("relay: sending stun request: %w", err)
		}
		rctx, cancel := context.WithTimeout(ctx, stunRetransmit)
		for {
			n, err := read(rctx, buf)
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				break
			}
			if err != nil {
				cancel()
				return netip.AddrPort{}, fmt.Errorf("relay: reading stun response: %w", err)
			}
			if !stun.IsMessage(buf[:n]) {
				continue
			}
			res := &stun.Message{Raw: append([]byte(nil), buf[:n]...)}
			if res.Decode() != nil || res.TransactionID != req.TransactionID {
				continue
			}
			cancel()
			if res.Type != stun.BindingSuccess {
				return netip.AddrPort{}, fmt.Errorf("relay: stun server answered %s", res.Type)
			}
			var xa stun.XORMappedAddress
			if err := xa.GetFrom(res); err != nil {
				return netip.AddrPort{}, fmt.Errorf("relay: stun response: %w", err)
			}
			ip, ok := netip.AddrFromSlice(xa.IP)
			if !ok {
				return netip.AddrPort{}, fmt.Errorf("relay: stun response: bad address")
			}
			return netip.AddrPortFrom(ip.Unmap(), uint16(xa.Port)), nil
		}
		cancel()
	}
	return netip.AddrPort{}, fmt.Errorf("relay: no stun response from %s: %w", server, ctx.Err())
}

// Reflexive asks the STUN server at server for the mesh socket's
// server-reflexive address while the mesh keeps running on it (non-QUIC
// packets are told apart by their first bits). It gives up after
// ReflexiveTimeout or when ctx ends. Calls are serialised.
func (m *Mesh) Reflexive(ctx context.Context, server string) (netip.AddrPort, error) {
	m.stunMu.Lock()
	defer m.stunMu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, ReflexiveTimeout)
	defer cancel()
	tr := m.primary.tr
	return stunBinding(ctx, server,
		func(b []byte, to net.Addr) error {
			_, err := tr.WriteTo(b, to)
			return err
		},
		func(ctx context.Context, b []byte) (int, error) {
			n, _, err := tr.ReadNonQUICPacket(ctx, b)
			return n, err
		})
}
