package circlenode

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

// StorageKeyInfo is the HKDF label of the at-rest key for certificate keys.
const StorageKeyInfo = "circle storage keys v1"

// Config is what Open needs.
type Config struct {
	Replicator replicator.Config
	Identity   identity.Config
	// SyncTimeout bounds how long Open waits for a first exchange of state
	// with a peer when Replicator.Join is set (0: no wait).
	SyncTimeout time.Duration

	// Listen is the UDP address of the mesh socket (the replicator's
	// BindAddr is only informative once the mesh carries memberlist).
	Listen string
	// Advertise is the configured advertise address ("" = derived from
	// Listen or the machine's outbound address, see meshAdvertise).
	Advertise string
	// Relay is the TURN/STUN bind address ([host]:port), "" when this
	// node is not a relay.
	Relay string
	// Logger is the base structured logger for the node, the mesh, the
	// path manager and the TURN server. Default: discard.
	Logger *slog.Logger
}

// IdentityBuckets sets what identity's records need from the replicated
// store: its first-writer-wins buckets (username claims) and the buckets
// merged per field (accounts, invites).
func IdentityBuckets(rc *replicator.Config) {
	rc.FirstWriterWins = identity.FirstWriterWinsBuckets()
	rc.Merge = map[string]replicator.MergeFunc{}
	for b, fn := range identity.MergeFuncs() {
		rc.Merge[b] = fn
	}
}

// Fingerprint digests the settings that need a new node to change, so a
// reload with different settings can say that they are not applied. It
// never leaves the process.
func (c Config) Fingerprint() [32]byte {
	h := sha256.New()
	w := func(s string) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(s)))
		h.Write(n[:])
		io.WriteString(h, s)
	}
	r := c.Replicator
	w(r.Name)
	w(r.DataDir)
	w(string(r.Secret))
	w(r.BindAddr)
	w(r.AdvertiseAddr)
	for _, j := range r.Join {
		w(j)
	}
	w(fmt.Sprint(r.Replicas, r.AckTimeout, r.AntiEntropyInterval, r.FirstWriterWins, r.MaxClockSkew))
	w(c.Identity.Domain)
	w(c.Listen)
	w(c.Advertise)
	w(c.Relay)
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// Node is one process's mesh (one UDP socket carrying memberlist,
// replication and circle services), its path manager and TURN server, one
// replicator node and the identity service on top of it. Open creates it;
// Close closes it.
type Node struct {
	name        string
	log         *slog.Logger
	mesh        *relay.Mesh
	manager     *relay.Manager
	turn        *relay.Server  // nil unless this node is a relay
	turnAddr    string         // the TURN address peers learn ("" if none)
	pendingTURN net.PacketConn // the TURN socket between openMesh and startRelay
	services    *Services
	lastPeer    sync.Map       // service name -> the peer that took its last stream
	bg          sync.WaitGroup // background seed connections
	repl        *replicator.Node
	ident       *identity.Service
	storageKey  []byte // AES-256 key for certificate private keys at rest
	fingerprint [32]byte
	ctx         context.Context    // cancelled by Close
	cancel      context.CancelFunc // ends the initial sync wait, identity start and proxied service streams
}

// Name returns the node's name.
func (n *Node) Name() string { return n.name }

// Replicator returns the replicated store.
func (n *Node) Replicator() *replicator.Node { return n.repl }

// Identity returns the identity service.
func (n *Node) Identity() *identity.Service { return n.ident }

// Mesh returns the mesh.
func (n *Node) Mesh() *relay.Mesh { return n.mesh }

// Manager returns the path manager.
func (n *Node) Manager() *relay.Manager { return n.manager }

// TURNAddr returns the TURN address peers learn, "" unless this node is a
// relay.
func (n *Node) TURNAddr() string { return n.turnAddr }

// Services returns the registry of the circle services this node offers.
func (n *Node) Services() *Services { return n.services }

// StorageKey returns the AES-256 key for certificate private keys at rest,
// derived from the circle secret under StorageKeyInfo.
func (n *Node) StorageKey() []byte { return n.storageKey }

// Fingerprint returns the Fingerprint of the Config the node was opened
// with.
func (n *Node) Fingerprint() [32]byte { return n.fingerprint }

// Close closes, in order: the services (their mesh handlers and live
// streams), the path manager (its allocations), the identity service, the
// replicator (it leaves the circle over the mesh, then shuts down the mesh
// transport), the TURN server and finally the mesh and its socket. It
// tolerates a partially opened node.
func (s *Node) Close() error {
	s.cancel()
	s.bg.Wait()
	var errs []error
	if s.services != nil {
		s.services.close()
	}
	if s.manager != nil {
		if err := s.manager.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing path manager: %w", err))
		}
	}
	if s.ident != nil {
		if err := s.ident.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing identity service: %w", err))
		}
	}
	if s.repl != nil {
		if err := s.repl.Close(); err != nil && !errors.Is(err, replicator.ErrClosed) {
			errs = append(errs, fmt.Errorf("closing replicator: %w", err))
		}
	}
	if s.turn != nil {
		if err := s.turn.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing relay server: %w", err))
		}
	}
	if s.pendingTURN != nil {
		s.pendingTURN.Close()
	}
	if s.mesh != nil {
		if err := s.mesh.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("closing mesh: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Open opens the mesh on the listen socket (and the TURN server, for a
// relay), the replicator over the mesh, the path manager, waits (bounded)
// for a first exchange of state with a peer, then starts the identity
// service.
func Open(cfg Config) (*Node, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	key, err := hkdf.Key(sha256.New, cfg.Replicator.Secret, nil, StorageKeyInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("deriving storage key: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	sn := &Node{name: cfg.Replicator.Name, log: cfg.Logger, storageKey: key, fingerprint: cfg.Fingerprint(), ctx: ctx, cancel: cancel}
	if err := sn.openMesh(cfg); err != nil {
		sn.Close()
		return nil, err
	}
	rc := cfg.Replicator
	start := time.Now()
	rc.Join = sn.preconnect(rc.Join, seedBudget)
	tr, err := sn.mesh.Transport()
	if err != nil {
		sn.Close()
		return nil, fmt.Errorf("mesh transport: %w", err)
	}
	rc.Transport = tr
	repl, err := replicator.Open(rc)
	if err != nil {
		tr.Shutdown()
		sn.Close()
		return nil, fmt.Errorf("opening replicator: %w", err)
	}
	sn.repl = repl
	if err := sn.startRelay(cfg); err != nil {
		sn.Close()
		return nil, err
	}

	waitInitialSync(ctx, repl, len(cfg.Replicator.Join) > 0, start, cfg.SyncTimeout, cfg.Logger)

	icfg := cfg.Identity
	if icfg.Now == nil {
		icfg.Now = repl.Now // a node whose clock alone is slow follows the circle's (replicator/skew.go)
	}
	ident, err := identity.New(IdentityStore(repl), icfg)
	if err != nil {
		sn.Close()
		return nil, fmt.Errorf("creating identity service: %w", err)
	}
	sn.ident = ident
	startCtx, cancelStart := context.WithTimeout(ctx, identityStartTimeout)
	err = ident.Start(startCtx)
	cancelStart()
	if err != nil {
		sn.Close()
		return nil, fmt.Errorf("starting identity service: %w", err)
	}
	cfg.Logger.Info("circle node opened",
		"name", cfg.Replicator.Name,
		"data_dir", cfg.Replicator.DataDir,
		"listen", cfg.Listen,
		"advertise", sn.mesh.Addr().String(),
		"relay", sn.turnAddr)
	return sn, nil
}

// identityStartTimeout bounds the identity service's start (loading its
// state and, on a new circle, writing the first signing key).
const identityStartTimeout = 30 * time.Second

// joinGrace is how long a joining node waits for any peer to answer before
// it starts alone (the first node of a circle, or every seed down).
const joinGrace = 3 * time.Second

// waitInitialSync blocks until the node has exchanged state with a peer, no
// peer answered within joinGrace, or timeout passed. Without it a node that
// starts next to a running circle would not yet see the shared CA and would
// create a second root. It polls; the replicator joins in the background.
func waitInitialSync(ctx context.Context, n *replicator.Node, joining bool, start time.Time, timeout time.Duration, log *slog.Logger) {
	if !joining || timeout <= 0 {
		return
	}
	deadline := start.Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		peers := AlivePeers(n)
		if peers > 0 && synced(n, start) {
			log.Info("synced with the circle", "alive_peers", peers, "took", time.Since(start))
			return
		}
		now := time.Now()
		if peers == 0 && now.Sub(start) > min(joinGrace, timeout) {
			log.Info("no peer reachable yet; starting alone, joining in the background")
			return
		}
		if now.After(deadline) {
			log.Warn("no complete exchange of state with a peer yet; continuing", "alive_peers", peers,
				"waited", timeout)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// AlivePeers counts the alive members other than n itself (suspect ones
// not included).
func AlivePeers(n *replicator.Node) int {
	c := 0
	for _, m := range n.Members() {
		if m.Name != n.Name() && m.State == replicator.StateAlive {
			c++
		}
	}
	return c
}

// synced reports whether n completed an anti-entropy exchange since t.
func synced(n *replicator.Node, t time.Time) bool {
	return n.Stats().LastAntiEntropy.After(t)
}

// IdentityStore adapts a replicated store to identity.Store.
func IdentityStore(n *replicator.Node) identity.Store { return identityStore{n} }

// identityStore adapts *replicator.Node to identity.Store.
type identityStore struct {
	n *replicator.Node
}

// mapErr turns replicator.ErrNotFound into identity.ErrNotFound.
func mapErr(err error) error {
	if errors.Is(err, replicator.ErrNotFound) {
		return fmt.Errorf("%w: %w", identity.ErrNotFound, err)
	}
	return err
}

// Get implements identity.Store.
func (s identityStore) Get(bucket, key string) ([]byte, error) {
	r, err := s.n.Get(bucket, key)
	if err != nil {
		return nil, mapErr(err)
	}
	return r.Value, nil
}

// List implements identity.Store.
func (s identityStore) List(bucket, prefix string) ([]identity.Entry, error) {
	recs, err := s.n.List(bucket, prefix)
	if err != nil {
		return nil, mapErr(err)
	}
	out := make([]identity.Entry, 0, len(recs))
	for _, r := range recs {
		out = append(out, identity.Entry{Key: r.Key, Value: r.Value})
	}
	return out, nil
}

// Put implements identity.Store.
func (s identityStore) Put(ctx context.Context, bucket, key string, value []byte) error {
	return mapErr(s.n.Put(ctx, bucket, key, value))
}

// Delete implements identity.Store.
func (s identityStore) Delete(ctx context.Context, bucket, key string) error {
	return mapErr(s.n.Delete(ctx, bucket, key))
}

// PutAsync implements identity.Store.
func (s identityStore) PutAsync(bucket, key string, value []byte) error {
	return mapErr(s.n.PutAsync(bucket, key, value))
}

// Watch implements identity.Store.
func (s identityStore) Watch(bucket string, fn func(key string, value []byte, deleted bool)) (cancel func()) {
	return s.n.Watch(bucket, func(r replicator.Record) {
		fn(r.Key, r.Value, r.Deleted)
	})
}

// Interface guards
var _ identity.Store = identityStore{}
