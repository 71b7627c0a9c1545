package circlenode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/homecircle/circle/relay"
)

// Circle services: `service NAME UPSTREAM` in the circle block offers the
// local TCP app at UPSTREAM to the circle as mesh service "svc/NAME"; the
// `circle` reverse_proxy transport (transport.go) reaches it from any node.

// ServiceDialTimeout bounds dialing a service: the local upstream, or the
// mesh streams to the peers offering it (all of them together).
const ServiceDialTimeout = 10 * time.Second

// servicePrefix is the mesh service name prefix of circle services.
const servicePrefix = "svc/"

var serviceNameRE = regexp.MustCompile(`^[a-z0-9-]{1,63}$`)

// ValidServiceName reports whether name may name a circle service.
func ValidServiceName(name string) bool { return serviceNameRE.MatchString(name) }

// ValidateUpstream checks a service upstream: host:port with a numeric port.
func ValidateUpstream(up string) error {
	host, port, err := net.SplitHostPort(up)
	if err != nil {
		return fmt.Errorf("want host:port: %v", err)
	}
	if host == "" {
		return errors.New("want host:port with a host (e.g. 127.0.0.1:3000)")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not a number from 1 to 65535", port)
	}
	return nil
}

// ValidateServices checks a services map (name -> upstream).
func ValidateServices(svcs map[string]string) error {
	for name, up := range svcs {
		if !ValidServiceName(name) {
			return fmt.Errorf("circle: service name %q: use 1 to 63 of a-z, 0-9 and '-'", name)
		}
		if err := ValidateUpstream(up); err != nil {
			return fmt.Errorf("circle: service %s upstream %q: %v", name, up, err)
		}
	}
	return nil
}

// Services holds the services this node offers, per owner (caddymodule's App
// registers its set in Start and removes it in Stop/Cleanup). During a
// reload both configs are registered for a moment; the newest wins. One
// mesh handler per name looks the current upstream up on every stream, so
// a reload never leaves a gap.
type Services struct {
	ctx  context.Context // the node's: cancelled when it closes
	mesh *relay.Mesh
	log  *slog.Logger

	mu      sync.Mutex
	sets    []serviceSet    // oldest first
	handled map[string]bool // names with a mesh handler
	closed  bool
	wg      sync.WaitGroup // running proxied streams
}

type serviceSet struct {
	owner any
	svcs  map[string]string
}

func newServices(ctx context.Context, mesh *relay.Mesh, log *slog.Logger) *Services {
	return &Services{ctx: ctx, mesh: mesh, log: log.With("component", "services"), handled: map[string]bool{}}
}

// Set makes svcs owner's services (replacing owner's previous set) and the
// newest set.
func (r *Services) Set(owner any, svcs map[string]string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.dropLocked(owner)
	cp := make(map[string]string, len(svcs))
	for k, v := range svcs {
		cp[k] = v
	}
	r.sets = append(r.sets, serviceSet{owner: owner, svcs: cp})
	r.syncHandlersLocked()
}

// Remove drops owner's services. Names no other set offers stop being
// served (streams in progress finish).
func (r *Services) Remove(owner any) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.dropLocked(owner)
	r.syncHandlersLocked()
}

func (r *Services) dropLocked(owner any) {
	for i, s := range r.sets {
		if s.owner == owner {
			r.sets = append(r.sets[:i:i], r.sets[i+1:]...)
			return
		}
	}
}

// syncHandlersLocked registers a mesh handler for every offered name and
// removes the others.
func (r *Services) syncHandlersLocked() {
	want := map[string]bool{}
	for _, s := range r.sets {
		for name := range s.svcs {
			want[name] = true
		}
	}
	for name := range want {
		if !r.handled[name] {
			r.handled[name] = true
			r.mesh.Handle(servicePrefix+name, r.handler(name))
		}
	}
	for name := range r.handled {
		if !want[name] {
			delete(r.handled, name)
			r.mesh.Handle(servicePrefix+name, nil)
		}
	}
}

// lookup returns the upstream of name in the newest set that offers it.
func (r *Services) lookup(name string) (string, bool) {
	if r == nil {
		return "", false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return "", false
	}
	for i := len(r.sets) - 1; i >= 0; i-- {
		if up, ok := r.sets[i].svcs[name]; ok {
			return up, true
		}
	}
	return "", false
}

// Current returns the services offered now (name -> upstream).
func (r *Services) Current() map[string]string {
	out := map[string]string{}
	if r == nil {
		return out
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.sets {
		for k, v := range s.svcs {
			out[k] = v
		}
	}
	return out
}

// close unregisters every handler and waits for the proxied streams, which
// end because the node's context is cancelled first.
func (r *Services) close() {
	r.mu.Lock()
	r.closed = true
	for name := range r.handled {
		r.mesh.Handle(servicePrefix+name, nil)
	}
	r.handled = map[string]bool{}
	r.sets = nil
	r.mu.Unlock()
	r.wg.Wait()
}

// enter registers a running stream; false once the registry closed.
func (r *Services) enter() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	r.wg.Add(1)
	return true
}

// handler serves mesh streams of service name: it dials the current
// upstream and copies both ways.
func (r *Services) handler(name string) func(net.Conn) {
	return func(c net.Conn) {
		if !r.enter() {
			c.Close()
			return
		}
		defer r.wg.Done()
		up, ok := r.lookup(name)
		if !ok {
			c.Close()
			return
		}
		ctx, cancel := context.WithTimeout(r.ctx, ServiceDialTimeout)
		var d net.Dialer
		uc, err := d.DialContext(ctx, "tcp", up)
		cancel()
		if err != nil {
			r.log.Warn("circle service upstream unreachable", "service", name,
				"upstream", up, "from", c.RemoteAddr().String(), "error", err)
			c.Close()
			return
		}
		pipe(r.ctx, c, uc)
	}
}

// pipe copies between a mesh stream and a TCP conn until both directions
// end, passing half-closes on (an EOF on one side closes the other's write
// direction). It closes both when either fails, when ctx ends (the node
// closes) or when the mesh stream's connection dies while the upstream
// still has to answer. It returns once both copies returned.
func pipe(ctx context.Context, stream, upstream net.Conn) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			stream.Close()
			upstream.Close()
		})
	}
	defer closeBoth()
	stopCtx := context.AfterFunc(ctx, closeBoth)
	defer stopCtx()
	// A mesh stream's context ends when its write side does: when this
	// end closes it (after the upstream's EOF), or when the connection
	// dies or the peer stops reading. Only the latter end the pipe.
	var wroteEOF atomic.Bool
	if sc, ok := stream.(interface{ Context() context.Context }); ok {
		stop := context.AfterFunc(sc.Context(), func() {
			if !wroteEOF.Load() {
				closeBoth()
			}
		})
		defer stop()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if _, err := io.Copy(upstream, stream); err != nil {
			closeBoth()
			return
		}
		closeWrite(upstream)
	}()
	if _, err := io.Copy(stream, upstream); err != nil {
		closeBoth()
	} else {
		wroteEOF.Store(true)
		closeWrite(stream)
	}
	<-done
}

// closeWrite closes c's write direction only, if it can (a TCP conn, or a
// relay mesh stream: its CloseWrite sends the QUIC stream's FIN and keeps
// reading); else it closes c.
func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// ErrNoServiceNode is the error when no node offers a service (the
// transport turns it into a dial error: 502).
var ErrNoServiceNode = errors.New("no node of the circle offers this service")

// DialService connects to circle service name: the local upstream when
// this node offers it, else (or if that fails) the first connected peer
// that accepts a stream for it: the one that answered last time first,
// then by path quality (direct, punched, relayed) and RTT.
func (sn *Node) DialService(ctx context.Context, name string) (net.Conn, error) {
	if !ValidServiceName(name) {
		return nil, fmt.Errorf("circle service %q: invalid name", name)
	}
	ctx, cancel := context.WithTimeout(ctx, ServiceDialTimeout)
	defer cancel()
	var localErr error
	if up, ok := sn.services.lookup(name); ok {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", up)
		if err == nil {
			return c, nil
		}
		localErr = fmt.Errorf("local upstream %s: %w", up, err)
	}
	peers := sn.servicePeers(name)
	if len(peers) == 0 {
		if localErr != nil {
			return nil, fmt.Errorf("circle service %q: %w (and no peer is connected)", name, localErr)
		}
		return nil, fmt.Errorf("circle service %q: %w (no peer is connected)", name, ErrNoServiceNode)
	}
	c, peer, err := sn.mesh.DialAny(ctx, peers, servicePrefix+name)
	if err != nil {
		if errors.Is(err, relay.ErrNoService) && ctx.Err() == nil {
			err = fmt.Errorf("%w: %w", ErrNoServiceNode, err)
		}
		return nil, fmt.Errorf("circle service %q: %w", name, errors.Join(localErr, err))
	}
	sn.lastPeer.Store(name, peer)
	return c, nil
}

// servicePeers orders the connected peers for a service dial.
func (sn *Node) servicePeers(name string) []string {
	type cand struct {
		name string
		rank int
		rtt  time.Duration
	}
	best := map[string]*cand{}
	for _, p := range sn.mesh.Paths() {
		r := pathRank(p.Kind)
		c := best[p.Peer]
		if c == nil || r < c.rank || (r == c.rank && p.RTT < c.rtt) {
			best[p.Peer] = &cand{name: p.Peer, rank: r, rtt: p.RTT}
		}
	}
	list := make([]*cand, 0, len(best))
	for _, c := range best {
		list = append(list, c)
	}
	lastAny, _ := sn.lastPeer.Load(name)
	last, _ := lastAny.(string)
	sort.Slice(list, func(i, j int) bool {
		a, b := list[i], list[j]
		if (a.name == last) != (b.name == last) {
			return a.name == last
		}
		if a.rank != b.rank {
			return a.rank < b.rank
		}
		if a.rtt != b.rtt {
			return a.rtt < b.rtt
		}
		return a.name < b.name
	})
	out := make([]string, len(list))
	for i, c := range list {
		out[i] = c.name
	}
	return out
}

// pathRank orders path kinds: direct, punched, relayed.
func pathRank(k relay.PathKind) int {
	switch k {
	case relay.PathDirect:
		return 0
	case relay.PathPunched:
		return 1
	}
	return 2
}
