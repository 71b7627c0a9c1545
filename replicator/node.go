package replicator

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	bolt "go.etcd.io/bbolt"
)

const (
	leaveTimeout    = 2 * time.Second
	incomingQueue   = 1024 // gossip messages waiting to be applied
	maxQueuedGossip = 4096 // broadcasts kept in the transmit queue
)

// Node is one member of the circle: a local durable store plus membership
// and replication. Its methods are safe for concurrent use.
type Node struct {
	cfg       Config
	log       *slog.Logger
	db        *bolt.DB
	fww       map[string]bool
	streamKey []byte
	mux       *muxTransport
	ml        atomic.Pointer[memberlist.Memberlist]
	bcast     *memberlist.TransmitLimitedQueue
	watch     *watcher
	incoming  chan []Record // gossiped records for the applier
	aeKick    chan string   // peers to run anti-entropy with now

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // background goroutines and calls in flight

	lifeMu sync.RWMutex // guards closed
	closed bool

	mu    sync.Mutex // guards ix, clock and skew.aside; serialises writes to db
	ix    index
	clock hlc
	skew  skewState // records refused for clock skew, peers' clock offsets (skew.go)

	poolMu sync.Mutex               // guards pool and dialed
	pool   map[string][]*secureConn // idle outbound streams by peer name
	dialed map[*secureConn]struct{} // every open outbound stream

	wire wireState // what peers speak (version.go)

	membersMu  sync.Mutex             // guards members, known and knownDirty
	members    map[string]*memberInfo // every other node seen, by name
	known      map[string]string      // last known address of every other node ever seen (persisted)
	knownDirty bool                   // known changed since it was stored

	heal healer // retries of members and seeds out of contact (heal.go)
	port int    // the bind port, for seeds given without one

	probeInterval time.Duration // memberlist's, for suspicion in Members

	statsMu    sync.Mutex // guards lastAE and lastAEPeer
	lastAE     time.Time
	lastAEPeer string

	under    underReplicated // writes with fewer than Replicas copies (acks.go)
	acceptor *leaseAcceptor  // grants lock leases (lease.go); set by Open

	pendingAcks   atomic.Int64
	ackTimeouts   atomic.Uint64
	aeRounds      atomic.Uint64
	sent          atomic.Uint64 // records sent over streams
	received      atomic.Uint64 // records received (gossip and streams)
	aeSent        atomic.Uint64
	aeReceived    atomic.Uint64
	gossipDropped atomic.Uint64

	ae      aeState     // anti-entropy and garbage-collection state (gc.go)
	commits commitQueue // writes waiting for a transaction (commit.go)
}

// Member is a node of the circle as seen by this node.
type Member struct {
	Name  string
	Addr  string // host:port of its gossip endpoint
	State MemberState

	// ClockOffset is the peer's wall clock minus this node's, measured
	// from probe acks when ClockMeasured (never for this node itself).
	// Beyond Config.MaxClockSkew either way, one side's records are kept
	// aside by the other until its clock catches up.
	ClockOffset   time.Duration
	ClockMeasured bool
}

// MemberState is what a node knows of a member's liveness (see Members).
type MemberState string

// The member states.
const (
	StateAlive   MemberState = "alive"   // in contact, answering direct probes
	StateSuspect MemberState = "suspect" // still listed, but no direct probe answered for a while
	StateDead    MemberState = "dead"    // gone without notice
	StateLeft    MemberState = "left"    // announced that it leaves
)

// Stats are counters and state for monitoring.
type Stats struct {
	Records             int       `json:"records"`                   // live records stored here
	Tombstones          int       `json:"tombstones"`                // deleted records kept as tombstones
	Buckets             int       `json:"buckets"`                   // buckets with at least one record
	AliveMembers        int       `json:"alive_members"`             // alive or suspect nodes, this one included
	PendingAcks         int       `json:"pending_acks"`              // Put/Delete calls waiting for acknowledgements
	AckTimeouts         uint64    `json:"ack_timeouts"`              // Put/Delete calls that returned ErrAckTimeout
	LastAntiEntropy     time.Time `json:"last_anti_entropy"`         // end of the last completed exchange (either side); zero if none
	LastAntiEntropyPeer string    `json:"last_anti_entropy_peer"`    // the peer of that exchange
	AntiEntropyRounds   uint64    `json:"anti_entropy_rounds"`       // completed exchanges (either side)
	AntiEntropySent     uint64    `json:"anti_entropy_records_sent"` // records shipped by anti-entropy
	AntiEntropyReceived uint64    `json:"anti_entropy_records_received"`
	RecordsSent         uint64    `json:"records_sent"`     // records sent over streams (acked writes and anti-entropy)
	RecordsReceived     uint64    `json:"records_received"` // records received (gossip and streams)
	BroadcastQueue      int       `json:"broadcast_queue"`  // gossip messages waiting for transmission
	GossipDropped       uint64    `json:"gossip_dropped"`   // gossiped records dropped because the apply queue was full
	SkewRefused         uint64    `json:"skew_refused"`     // remote records refused as too far ahead of our clock (each offer counts)
	KeptAside           int       `json:"kept_aside"`       // refused records held until our clock catches up

	AntiEntropyMetaBytes uint64    `json:"anti_entropy_meta_bytes"` // anti-entropy metadata (digests, hashes, key listings, wants) sent, in bytes
	AntiEntropyMetaKeys  uint64    `json:"anti_entropy_meta_keys"`  // keys listed in that metadata
	TombstonesCollected  uint64    `json:"tombstones_collected"`    // tombstones removed after Config.TombstoneHorizon
	ResyncDropped        uint64    `json:"resync_dropped"`          // records dropped by a resync after the horizon (deleted elsewhere meanwhile)
	LastSync             time.Time `json:"last_sync"`               // start of the last completed tree exchange (persisted); zero if none
	UnderReplicated      int       `json:"under_replicated"`        // records written here known on fewer than Replicas nodes, re-sent as nodes return (acks.go)
}

// Open opens the store in cfg.DataDir, starts memberlist on cfg.BindAddr and
// joins cfg.Join in the background. It returns quickly; a joining node
// catches up by anti-entropy as soon as it meets a peer.
func Open(cfg Config) (*Node, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	db, err := openDB(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("replicator: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			db.Close()
		}
	}()
	ix, clock, storedName, err := loadState(db)
	if err != nil {
		return nil, fmt.Errorf("replicator: %w", err)
	}
	if storedName != cfg.Name {
		if storedName != "" {
			cfg.Logger.Warn("data dir was last used by another node name", "data_dir", cfg.DataDir, "was", storedName, "now", cfg.Name)
		}
		if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bktMeta).Put(keyName, []byte(cfg.Name)) }); err != nil {
			return nil, fmt.Errorf("replicator: storing node name: %w", err)
		}
	}
	known, err := loadKnown(db)
	if err != nil {
		cfg.Logger.Warn("ignoring unreadable known members", "error", err)
	}
	streamKey, err := deriveStreamKey(cfg.Secret)
	if err != nil {
		return nil, fmt.Errorf("replicator: deriving stream key: %w", err)
	}
	mlKey, err := hkdf.Key(sha256.New, cfg.Secret, nil, "circle memberlist v1", 32)
	if err != nil {
		return nil, fmt.Errorf("replicator: deriving memberlist key: %w", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	n := &Node{
		cfg:       cfg,
		log:       cfg.Logger,
		db:        db,
		fww:       make(map[string]bool),
		streamKey: streamKey,
		watch:     newWatcher(cfg.Logger),
		incoming:  make(chan []Record, incomingQueue),
		aeKick:    make(chan string, 64),
		ctx:       ctx,
		cancel:    cancel,
		ix:        ix,
		clock:     newClock(clock, cfg),
		pool:      make(map[string][]*secureConn),
		dialed:    make(map[*secureConn]struct{}),
		members:   make(map[string]*memberInfo),
		known:     known,
		heal:      healer{targets: make(map[string]*healTarget)},
	}
	n.clock.now = n.circleNow // the circle's time as this node knows it (skew.go)
	n.clock.known = n.circleKnown
	for _, b := range cfg.FirstWriterWins {
		n.fww[b] = true
	}
	n.bcast = &memberlist.TransmitLimitedQueue{NumNodes: n.numMembers, RetransmitMult: 4}

	mlLog := log.New(logWriter{n.log.With("component", "memberlist")}, "", 0)
	host, port, _ := splitHostPort(cfg.BindAddr) // validated by withDefaults
	n.port = port
	inner := cfg.Transport
	ownsTCP := false
	if inner == nil {
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
			BindAddrs: []string{host},
			BindPort:  port,
			Logger:    mlLog,
		})
		if err != nil {
			cancel()
			return nil, fmt.Errorf("replicator: listening on %s: %w", cfg.BindAddr, err)
		}
		inner, ownsTCP = nt, true
	}
	n.mux = newMux(inner, ownsTCP, n.serveStream)

	mc := memberlist.DefaultLANConfig()
	mc.Name = cfg.Name
	mc.BindAddr, mc.BindPort = host, port
	if cfg.AdvertiseAddr != "" {
		mc.AdvertiseAddr, mc.AdvertisePort, _ = splitHostPort(cfg.AdvertiseAddr)
	}
	mc.Transport = n.mux
	mc.SecretKey = mlKey
	mc.GossipVerifyIncoming = true
	mc.GossipVerifyOutgoing = true
	mc.Delegate = delegate{n}
	mc.Events = events{n}
	mc.Ping = pings{n}
	mc.Logger = mlLog
	mc.DeadNodeReclaimTime = 30 * time.Second // home servers change addresses
	// A circle has a handful of nodes, so a suspicion rarely collects the
	// independent confirmations that shorten it, and memberlist's default
	// ceiling (6x the 4 s minimum) would leave a crashed node "alive" for
	// ~24 s, holding up acknowledged writes that wait for it. 2x keeps a
	// slow node some slack and declares a dead one within ~8 s.
	mc.SuspicionMaxTimeoutMult = 2
	if cfg.tune != nil {
		cfg.tune(mc)
	}
	n.probeInterval = mc.ProbeInterval
	ml, err := memberlist.Create(mc)
	if err != nil {
		n.mux.Shutdown()
		cancel()
		return nil, fmt.Errorf("replicator: starting memberlist: %w", err)
	}
	n.ml.Store(ml)
	ok = true

	n.acceptor = newLeaseAcceptor(n)
	n.wg.Add(6)
	go n.acceptor.run()
	go func() { defer n.wg.Done(); n.watch.run(ctx) }()
	go n.asideLoop()
	go n.applier()
	go n.antiEntropyLoop()
	go n.healLoop()
	n.startWireExtras() // test profiles only (version_next.go)
	n.log.Info("replicator node started", "name", cfg.Name, "addr", n.Addr(), "records", n.Stats().Records)
	return n, nil
}

// Name returns this node's name.
func (n *Node) Name() string { return n.cfg.Name }

// Addr returns the host:port this node advertises for gossip (with
// BindAddr port 0, the port actually bound).
func (n *Node) Addr() string { return n.ml.Load().LocalNode().Address() }

// enter registers a call in flight; false if the node is closed. Callers
// that get true must call n.wg.Done.
func (n *Node) enter() bool {
	n.lifeMu.RLock()
	defer n.lifeMu.RUnlock()
	if n.closed {
		return false
	}
	n.wg.Add(1)
	return true
}

// Close leaves the circle, stops every goroutine and closes the database.
// Calls waiting for acknowledgements return ErrClosed. Close is idempotent;
// it must not be called from a Watch callback.
func (n *Node) Close() error { return n.shutdown(true) }

// shutdown closes the node, announcing the departure if leave (tests crash
// nodes with leave false).
func (n *Node) shutdown(leave bool) error {
	n.lifeMu.Lock()
	if n.closed {
		n.lifeMu.Unlock()
		return nil
	}
	n.closed = true
	n.lifeMu.Unlock()

	ml := n.ml.Load()
	if leave {
		n.announceLeave()
	}
	n.cancel()
	n.closeAllConns()
	if leave {
		if err := ml.Leave(leaveTimeout); err != nil {
			n.log.Debug("leave not confirmed", "error", err)
		}
	}
	var errs []error
	if err := ml.Shutdown(); err != nil {
		errs = append(errs, fmt.Errorf("replicator: stopping memberlist: %w", err))
	}
	n.wg.Wait()
	if err := n.db.Close(); err != nil {
		errs = append(errs, fmt.Errorf("replicator: closing database: %w", err))
	}
	n.log.Info("replicator node stopped", "name", n.cfg.Name)
	return errors.Join(errs...)
}

// Get returns the live record of bucket/key; ErrNotFound if it is absent or
// tombstoned.
func (n *Node) Get(bucket, key string) (Record, error) {
	if err := checkKey(bucket, key); err != nil {
		return Record{}, err
	}
	if !n.enter() {
		return Record{}, ErrClosed
	}
	defer n.wg.Done()
	var r Record
	var found bool
	err := n.db.View(func(tx *bolt.Tx) error {
		var err error
		r, found, err = getRecord(tx, bucket, key)
		return err
	})
	if err != nil {
		return Record{}, fmt.Errorf("replicator: reading %s/%s: %w", bucket, key, err)
	}
	if !found || r.Deleted {
		return Record{}, fmt.Errorf("%w: %s/%s", ErrNotFound, bucket, key)
	}
	return r, nil
}

// List returns the live records of bucket whose key starts with prefix,
// sorted by key.
func (n *Node) List(bucket, prefix string) ([]Record, error) {
	if err := checkBucket(bucket); err != nil {
		return nil, err
	}
	if !n.enter() {
		return nil, ErrClosed
	}
	defer n.wg.Done()
	var out []Record
	err := n.db.View(func(tx *bolt.Tx) error {
		var err error
		out, err = listRecords(tx, bucket, prefix)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("replicator: listing %s: %w", bucket, err)
	}
	return out, nil
}

// Put stores value under bucket/key: it is fsynced locally, then sent to
// the other nodes. Put returns when Config.Replicas nodes (this one
// included) hold it, or every alive node if fewer are alive. After
// Config.AckTimeout it returns an error wrapping ErrAckTimeout; if ctx ends
// first, an error wrapping ctx.Err(). In both cases the record stays stored
// here and keeps replicating. In a FirstWriterWins bucket a Put over a live
// key is ignored (read the key back to learn the winner).
func (n *Node) Put(ctx context.Context, bucket, key string, value []byte) error {
	return n.write(ctx, bucket, key, value, false, n.cfg.Replicas)
}

// PutAll is Put acknowledged by every alive node, whatever
// Config.Replicas says: for records that any node may be asked for right
// after the write returns (an ACME challenge token, a lock lease that must
// meet every concurrent taker). Errors as for Put.
func (n *Node) PutAll(ctx context.Context, bucket, key string, value []byte) error {
	return n.write(ctx, bucket, key, value, false, math.MaxInt)
}

// Delete tombstones bucket/key, with Put's acknowledgement rules. Deleting
// an absent key stores a tombstone too.
func (n *Node) Delete(ctx context.Context, bucket, key string) error {
	return n.write(ctx, bucket, key, nil, true, n.cfg.Replicas)
}

// PutAsync stores value under bucket/key (fsynced locally) and replicates
// it in the background without waiting.
func (n *Node) PutAsync(bucket, key string, value []byte) error {
	return n.write(context.Background(), bucket, key, value, false, 0)
}

// DeleteAsync tombstones bucket/key and replicates it in the background.
func (n *Node) DeleteAsync(bucket, key string) error {
	return n.write(context.Background(), bucket, key, nil, true, 0)
}

// Watch calls fn after every change of the winning record of a key in
// bucket, local or remote, tombstones included. Calls are serial per Node,
// in commit order, from one goroutine, never while the Node holds a lock; fn
// must not block long (it delays every other watcher) and must not modify
// the record's Value. fn may call the Node's methods, except Close. The
// returned cancel stops further calls (a call already running finishes)
// and may be called more than once.
func (n *Node) Watch(bucket string, fn func(Record)) (cancel func()) {
	var once sync.Once
	c := n.watch.add(bucket, fn)
	return func() { once.Do(c) }
}

// write stores a local change and replicates it, waiting until replicas
// nodes hold it (or every alive node if fewer are alive); 0: no wait.
func (n *Node) write(ctx context.Context, bucket, key string, value []byte, deleted bool, replicas int) error {
	_, err := n.writeAck(ctx, bucket, key, value, deleted, replicas)
	return err
}

// writeAck is write that reports the copies the record has (see acks.go).
// A write that returns with fewer than Config.Replicas copies is tracked
// as under-replicated (not PutAsync/DeleteAsync, replicas 0). A change
// that lost in a first-writer-wins bucket reports Ack{} (nothing written).
func (n *Node) writeAck(ctx context.Context, bucket, key string, value []byte, deleted bool, replicas int) (Ack, error) {
	if err := checkKey(bucket, key); err != nil {
		return Ack{}, err
	}
	if len(value) > MaxValueLen {
		return Ack{}, fmt.Errorf("%w: value of %s/%s is %d bytes, the limit is %d", ErrInvalid, bucket, key, len(value), MaxValueLen)
	}
	if err := ctx.Err(); err != nil {
		return Ack{}, fmt.Errorf("replicator: writing %s/%s: %w", bucket, key, err)
	}
	if !n.enter() {
		return Ack{}, ErrClosed
	}
	defer n.wg.Done()
	rec, stored, err := n.writeLocal(bucket, key, value, deleted)
	if err != nil {
		if errors.Is(err, bolt.ErrDatabaseNotOpen) {
			return Ack{}, ErrClosed
		}
		return Ack{}, fmt.Errorf("replicator: storing %s/%s: %w", bucket, key, err)
	}
	if !stored {
		return Ack{}, nil // lost to an earlier live record in a first-writer-wins bucket
	}
	small := n.broadcast(rec)
	peers := n.alivePeers()
	ack := Ack{Copies: 1, Want: n.cfg.Replicas}
	if replicas > n.cfg.Replicas {
		ack.Want = max(n.cfg.Replicas, min(replicas, len(peers)+1)) // PutAll: every alive node
	}
	if replicas > 0 && ack.Copies < n.cfg.Replicas && len(peers) == 0 {
		n.trackUnder(rec, nil)
		return ack, nil
	}
	if replicas > 0 && min(replicas, len(peers)+1) > 1 {
		copies, holders, err := n.awaitAcks(ctx, rec, peers, replicas)
		ack.Copies = copies
		if copies < n.cfg.Replicas {
			n.trackUnder(rec, holders)
		}
		return ack, err
	}
	if !small && len(peers) > 0 {
		n.pushAsync(rec, peers)
	}
	return ack, nil
}

// writeLocal versions and stores a local change. stored is false if the
// change lost (first-writer-wins bucket).
func (n *Node) writeLocal(bucket, key string, value []byte, deleted bool) (Record, bool, error) {
	rec := Record{Bucket: bucket, Key: key, Deleted: deleted}
	if !deleted {
		rec.Value = append([]byte{}, value...)
	}
	return n.commitLocal(rec) // commit.go: group commit (and the clock-skew check of a local write)
}

// applyRemote merges records received from peers; rebroadcast re-gossips
// the small ones that changed something here.
func (n *Node) applyRemote(recs []Record, rebroadcast bool) error {
	_, err := n.applyRemoteHeld(recs, rebroadcast)
	return err
}

// applyRemoteHeld is applyRemote that also returns how many of recs this
// node accepted (stored, or older than what it stores); the others were
// refused for clock skew and kept aside (skew.go).
func (n *Node) applyRemoteHeld(recs []Record, rebroadcast bool) (int, error) {
	winners, held, err := n.commitRemote(recs) // commit.go: group commit
	if err != nil {
		return 0, err
	}
	if rebroadcast {
		for _, w := range winners {
			n.broadcast(w)
		}
	}
	return held, nil
}

// mergeLocked merges recs into the store in one fsynced transaction and
// queues watch events. It returns the records that became the winning
// record of their key. n.mu must be held.
func (n *Node) mergeLocked(recs []Record) ([]Record, error) {
	var winners []Record
	var pending map[[2]string]meta // winners of this batch, if more than one record
	if len(recs) > 1 {
		pending = make(map[[2]string]meta, len(recs))
	}
	for i := range recs {
		r := &recs[i]
		n.clock.observe(r.Version.Time) // refuses what is too far ahead (screenLocked kept it out of remote batches)
		k := [2]string{r.Bucket, r.Key}
		cur, ok := pending[k]
		if !ok {
			cur, ok = n.ix.get(r.Bucket, r.Key)
		}
		if ok && n.mergeable(r, cur) {
			var keep bool
			if *r, keep = n.joinLocked(*r, cur.v, winners); !keep {
				continue
			}
		} else if ok && !beats(n.fww[r.Bucket], r.meta(), cur) {
			continue
		}
		if pending != nil {
			pending[k] = r.meta()
		}
		winners = append(winners, *r)
	}
	if len(winners) == 0 {
		return nil, nil
	}
	if err := n.db.Update(func(tx *bolt.Tx) error { return putRecords(tx, winners, n.clock.last) }); err != nil {
		return nil, err
	}
	for i := range winners {
		n.ix.set(winners[i].Bucket, winners[i].Key, winners[i].meta())
	}
	n.watch.enqueue(winners)
	return winners, nil
}

// Stats returns current counters.
func (n *Node) Stats() Stats {
	n.mu.Lock()
	live, dead := n.ix.counts()
	buckets := len(n.ix)
	aside := len(n.skew.aside)
	n.mu.Unlock()
	n.statsMu.Lock()
	last, peer := n.lastAE, n.lastAEPeer
	n.statsMu.Unlock()
	s := Stats{
		UnderReplicated:     n.underCount(),
		Records:             live,
		Tombstones:          dead,
		Buckets:             buckets,
		AliveMembers:        len(n.alivePeers()) + 1,
		PendingAcks:         int(n.pendingAcks.Load()),
		AckTimeouts:         n.ackTimeouts.Load(),
		LastAntiEntropy:     last,
		LastAntiEntropyPeer: peer,
		AntiEntropyRounds:   n.aeRounds.Load(),
		AntiEntropySent:     n.aeSent.Load(),
		AntiEntropyReceived: n.aeReceived.Load(),
		RecordsSent:         n.sent.Load(),
		RecordsReceived:     n.received.Load(),
		BroadcastQueue:      n.bcast.NumQueued(),
		GossipDropped:       n.gossipDropped.Load(),
		SkewRefused:         n.skew.refused.Load(),
		KeptAside:           aside,
	}
	n.aeStats(&s)
	return s
}

// numMembers is the node count for the broadcast queue.
func (n *Node) numMembers() int {
	if ml := n.ml.Load(); ml != nil {
		return ml.NumMembers()
	}
	return 1
}

// delegate implements memberlist.Delegate. memberlist calls it from its
// packet and stream goroutines, concurrently; no method blocks.
type delegate struct{ n *Node }

func (d delegate) NodeMeta(limit int) []byte              { return nil }
func (d delegate) LocalState(join bool) []byte            { return nil }
func (d delegate) MergeRemoteState(buf []byte, join bool) {}
func (d delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.n.bcast.GetBroadcasts(overhead, limit)
}
func (d delegate) NotifyMsg(msg []byte) { d.n.handleGossip(msg) }

// logWriter turns memberlist's log lines ("[LEVEL] memberlist: text") into
// slog records. memberlist reports ordinary network trouble (a peer down)
// as [ERR], so that becomes Warn.
type logWriter struct{ l *slog.Logger }

func (w logWriter) Write(p []byte) (int, error) {
	s := strings.TrimSpace(string(p))
	lvl := slog.LevelInfo
	for _, x := range []struct {
		prefix string
		lvl    slog.Level
	}{{"[DEBUG]", slog.LevelDebug}, {"[INFO]", slog.LevelInfo}, {"[WARN]", slog.LevelWarn}, {"[ERR]", slog.LevelWarn}, {"[ERROR]", slog.LevelWarn}} {
		if strings.HasPrefix(s, x.prefix) {
			s, lvl = strings.TrimSpace(s[len(x.prefix):]), x.lvl
			break
		}
	}
	s = strings.TrimPrefix(s, "memberlist: ")
	w.l.Log(context.Background(), lvl, s)
	return len(p), nil
}

// randomPeer picks an alive peer at random, or nil.
func (n *Node) randomPeer() *peerRef {
	peers := n.alivePeers()
	if len(peers) == 0 {
		return nil
	}
	return peers[rand.IntN(len(peers))]
}
