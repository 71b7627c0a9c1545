package relay

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/pion/stun"
)

// ReflexiveTimeout bounds Reflexive when conn has no read deadline set by
// the caller.
const ReflexiveTimeout = 5 * time.Second

// Reflexive asks the STUN server at server (host:port) which address conn's
// packets arrive from: the server-reflexive address, i.e. conn's address on
// the far side of any NAT. It sends a Binding request (retransmitted every
// 500 ms) and waits up to ReflexiveTimeout for the matching response,
// discarding anything else read from conn, so conn must not be read by
// anyone else meanwhile (use it before handing conn to a Mesh). It leaves
// conn's read deadline cleared.
func Reflexive(conn net.PacketConn, server string) (netip.AddrPort, error) {
	raddr, err := net.ResolveUDPAddr("udp", server)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("relay: stun server %q: %w", server, err)
	}
	req, err := stun.Build(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("relay: building stun request: %w", err)
	}
	defer conn.SetReadDeadline(time.Time{})
	deadline := time.Now().Add(ReflexiveTimeout)
	buf := make([]byte, 1500)
	for time.Now().Before(deadline) {
		if _, err := conn.WriteTo(req.Raw, raddr); err != nil {
			return netip.AddrPort{}, fmt.Errorf("relay: sending stun request: %w", err)
		}
		retry := time.Now().Add(500 * time.Millisecond)
		if retry.After(deadline) {
			retry = deadline
		}
		conn.SetReadDeadline(retry)
		for {
			n, _, err := conn.ReadFrom(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				return netip.AddrPort{}, fmt.Errorf("relay: reading stun response: %w", err)
			}
			if !stun.IsMessage(buf[:n]) {
				continue
			}
			res := &stun.Message{Raw: append([]byte(nil), buf[:n]...)}
			if res.Decode() != nil || res.TransactionID != req.TransactionID {
				continue
			}
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
	}
	return netip.AddrPort{}, fmt.Errorf("relay: no stun response from %s within %v", server, ReflexiveTimeout)
}
