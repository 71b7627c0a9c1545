package circlenode

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

// The mesh wiring of a node (see docs/INTERNALS.md, "circlenode: the
// mesh wiring"): one UDP socket on Listen carries a relay.Mesh; memberlist, the
// replicator's streams and the circle services all ride on it. A relay
// node also runs a TURN/STUN server on its own socket (Relay), and every
// node runs the relay.Manager path policy over the replicator's members.

// openMesh binds the listen socket and starts the mesh on it, advertising
// a specific address (meshAdvertise). For a relay it also binds the TURN
// socket, so that the hellos the mesh sends carry the TURN address; the
// server itself starts in startRelay, once the manager exists.
func (sn *Node) openMesh(cfg Config) error {
	conn, err := net.ListenPacket("udp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("circle: listening on %s (udp): %w", cfg.Listen, err)
	}
	adv, err := meshAdvertise(cfg.Advertise, cfg.Listen, conn.LocalAddr())
	if err != nil {
		conn.Close()
		return err
	}
	var turnConn net.PacketConn
	if cfg.Relay != "" {
		turnConn, sn.turnAddr, err = bindRelay(cfg.Relay, adv)
		if err != nil {
			conn.Close()
			return err
		}
	}
	mesh, err := relay.NewMesh(relay.MeshConfig{
		Name:          cfg.Replicator.Name,
		Secret:        cfg.Replicator.Secret,
		Conn:          conn,
		AdvertiseAddr: adv.String(),
		TURN:          sn.turnAddr,
		Logger:        cfg.Logger.With("component", "mesh"),
	})
	if err != nil {
		conn.Close()
		if turnConn != nil {
			turnConn.Close()
		}
		return fmt.Errorf("circle: starting mesh: %w", err)
	}
	sn.mesh = mesh
	sn.services = newServices(sn.ctx, mesh, cfg.Logger)
	sn.pendingTURN = turnConn
	return nil
}

// startRelay starts the path manager over the replicator's members and,
// for a relay, the TURN server that relays only to the peers the manager
// reaches directly.
func (sn *Node) startRelay(cfg Config) error {
	mgr, err := relay.NewManager(relay.ManagerConfig{
		Mesh:    sn.mesh,
		Secret:  cfg.Replicator.Secret,
		Members: sn.meshMembers,
		Logger:  cfg.Logger.With("component", "paths"),
	})
	if err != nil {
		if sn.pendingTURN != nil {
			sn.pendingTURN.Close()
			sn.pendingTURN = nil
		}
		return fmt.Errorf("circle: starting path manager: %w", err)
	}
	sn.manager = mgr
	if sn.pendingTURN == nil {
		return nil
	}
	pc := sn.pendingTURN
	sn.pendingTURN = nil
	advIP := sn.mesh.Addr().(*net.UDPAddr).IP
	sc := relay.ServerConfig{
		Secret:       cfg.Replicator.Secret,
		PacketConn:   pc,
		RelayAddress: advIP,
		Peers:        mgr.PeerIPs,
		Logger:       cfg.Logger.With("component", "relay"),
	}
	if !isLocalIP(advIP) {
		// The advertised address is a router's (port forwarding): relay
		// sockets cannot bind to it.
		sc.RelayBindAddress = "0.0.0.0"
	}
	srv, err := relay.NewServer(sc)
	if err != nil {
		pc.Close()
		return fmt.Errorf("circle: starting relay on %s: %w", cfg.Relay, err)
	}
	sn.turn = srv
	return nil
}

// seedBudget bounds how long opening a node waits for a first seed to
// answer over the mesh before memberlist joins.
const seedBudget = 2 * time.Second

// preconnect dials every seed over the mesh at once and returns the seeds
// reordered: those that answered first (in the order they answered), then
// the others. It returns once one answered, all failed, or budget passed;
// the other attempts go on in the background. memberlist joins seeds one
// after the other, and a QUIC handshake to a seed that is down takes the
// whole handshake timeout (no "connection refused" over UDP), so without
// this a restarting node whose first seed is down would join seconds late.
func (sn *Node) preconnect(seeds []string, budget time.Duration) []string {
	if len(seeds) == 0 {
		return seeds
	}
	type result struct {
		seed string
		ok   bool
	}
	ch := make(chan result, len(seeds))
	ctx, cancel := context.WithTimeout(sn.ctx, relay.DefaultHandshakeTimeout)
	var wg sync.WaitGroup
	for _, seed := range seeds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			addr, err := net.ResolveUDPAddr("udp", seed)
			if err == nil {
				err = sn.mesh.Connect(ctx, "", addr)
			}
			ch <- result{seed, err == nil}
		}()
	}
	sn.bg.Add(1)
	go func() {
		defer sn.bg.Done()
		wg.Wait()
		cancel()
	}()
	timer := time.NewTimer(budget)
	defer timer.Stop()
	var first []string
	answered := map[string]bool{}
wait:
	for range seeds {
		select {
		case r := <-ch:
			if r.ok {
				first = append(first, r.seed)
				answered[r.seed] = true
				break wait
			}
		case <-timer.C:
			break wait
		}
	}
	for _, s := range seeds {
		if !answered[s] {
			first = append(first, s)
		}
	}
	return first
}

// meshMembers is the manager's view of the circle: the replicator's live
// members (alive, or suspect: those are the ones whose path needs work)
// other than this node.
func (sn *Node) meshMembers() []relay.Member {
	if sn.repl == nil {
		return nil
	}
	var out []relay.Member
	for _, m := range sn.repl.Members() {
		if m.Name == sn.name || (m.State != replicator.StateAlive && m.State != replicator.StateSuspect) {
			continue
		}
		out = append(out, relay.Member{Name: m.Name, Addr: m.Addr})
	}
	return out
}

// meshAdvertise returns the address this node advertises to the circle:
// advertise if set; else the listen host when it is a specific IP; else
// this machine's outbound IPv4 address. The port is advertise's, else the
// bound port. It must be a specific IP: peers dial it.
func meshAdvertise(advertise, listen string, bound net.Addr) (*net.UDPAddr, error) {
	port := 0
	if ua, ok := bound.(*net.UDPAddr); ok {
		port = ua.Port
	}
	if advertise != "" {
		ua, err := net.ResolveUDPAddr("udp", advertise)
		if err != nil {
			return nil, fmt.Errorf("circle: advertise address %q: %w", advertise, err)
		}
		if ua.IP == nil || ua.IP.IsUnspecified() {
			return nil, fmt.Errorf("circle: advertise address %q must name a specific IP address (or host name) that peers can reach", advertise)
		}
		if ua.Port == 0 {
			ua.Port = port
		}
		return ua, nil
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, fmt.Errorf("circle: listen address %q: %w", listen, err)
	}
	if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
		return &net.UDPAddr{IP: ip, Port: port}, nil
	}
	ip, err := outboundIPv4()
	if err != nil {
		return nil, fmt.Errorf("circle: listen address %q is not a specific IP and %v; set `advertise <ip:port>` in the circle block", listen, err)
	}
	return &net.UDPAddr{IP: ip, Port: port}, nil
}

// outboundIPv4 finds this machine's address for the circle, as memberlist
// does with a wildcard bind: the first private IPv4 address of an
// interface that is up, else the first global unicast IPv4 address.
func outboundIPv4() (net.IP, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("listing network interfaces: %w", err)
	}
	var public net.IP
	for _, ifc := range ifaces {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			n, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip4 := n.IP.To4()
			if ip4 == nil || !ip4.IsGlobalUnicast() {
				continue
			}
			if ip4.IsPrivate() || isCGNAT(ip4) {
				return ip4, nil
			}
			if public == nil {
				public = ip4
			}
		}
	}
	if public != nil {
		return public, nil
	}
	return nil, errors.New("no non-loopback IPv4 address was found on this machine")
}

// isCGNAT reports whether ip is in 100.64.0.0/10 (carrier-grade NAT, also
// used by home LANs in the NAT tests).
func isCGNAT(ip net.IP) bool {
	ip4 := ip.To4()
	return ip4 != nil && ip4[0] == 100 && ip4[1]&0xc0 == 64
}

// isLocalIP reports whether ip is assigned to an interface of this machine.
func isLocalIP(ip net.IP) bool {
	if ip.IsLoopback() {
		return true
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.Equal(ip) {
			return true
		}
	}
	return false
}

// bindRelay binds the TURN/STUN socket at relayAddr ([host]:port) and
// returns it with the TURN address peers are told: relayAddr's host if it
// is specific, else the advertised IP, with the bound port.
func bindRelay(relayAddr string, adv *net.UDPAddr) (net.PacketConn, string, error) {
	host, _, err := net.SplitHostPort(relayAddr)
	if err != nil {
		return nil, "", fmt.Errorf("circle: relay address %q: %w", relayAddr, err)
	}
	if adv == nil || adv.IP == nil || adv.IP.IsUnspecified() {
		return nil, "", fmt.Errorf("circle: relay %q needs a specific advertise address", relayAddr)
	}
	pc, err := net.ListenPacket("udp", relayAddr)
	if err != nil {
		return nil, "", fmt.Errorf("circle: relay: listening on %s (udp): %w", relayAddr, err)
	}
	port := pc.LocalAddr().(*net.UDPAddr).Port
	pub := adv.IP.String()
	if ip, err := netip.ParseAddr(host); err == nil && !ip.IsUnspecified() {
		pub = ip.String()
	}
	return pc, net.JoinHostPort(pub, strconv.Itoa(port)), nil
}
