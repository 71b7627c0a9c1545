// Command faultnode is the node process of the fault-injection suite
// (integration/faults): the product's node assembly without Caddy
// (caddymodule/circlenode: a relay.Mesh on one UDP socket carrying
// memberlist and replication streams, the relay.Manager path policy, one
// replicator.Node with identity's first-writer-wins and merged buckets, the
// initial sync wait, the identity.Service on top). The test driver talks to it over a
// small JSON control API on a unix socket (-ctl), which it reaches whatever
// network namespace, partition or address change the node is in.
//
// Its wall clock is time.Now plus an offset (-offset, and POST /clock at
// run time), handed to replicator.Config.Now; identity gets the replicator's
// Node.Now built on it (the node's clock, or the circle's median if later),
// as circlenode gives it in the product.
//
// It is a test binary: it trusts its caller. What it adds to circlenode is
// only the control API, the clock offset and cheaper password hashes.
package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/homecircle/circle/caddymodule/circlenode"
	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

// offset is added to time.Now for every clock the node's packages use.
var offset atomic.Int64

func now() time.Time { return time.Now().Add(time.Duration(offset.Load())) }

func main() {
	var (
		name       = flag.String("name", "", "node name (required)")
		dir        = flag.String("dir", "", "data directory (required)")
		secretFile = flag.String("secret-file", "", "file with the base64 circle secret (required)")
		listen     = flag.String("listen", "0.0.0.0:7946", "mesh UDP bind address")
		advertise  = flag.String("advertise", "", "advertised mesh address (default: derived as circlenode does)")
		join       = flag.String("join", "", "comma-separated seeds host:port")
		replicas   = flag.Int("replicas", 2, "acknowledged writes are on this many nodes")
		ackTimeout = flag.Duration("ack-timeout", 5*time.Second, "replicator AckTimeout")
		ctl        = flag.String("ctl", "", "unix socket of the control API (required)")
		domain     = flag.String("domain", "circle.test", "circle domain")
		off        = flag.Duration("offset", 0, "wall clock offset")
		horizon    = flag.Duration("tombstone-horizon", 0, "replicator TombstoneHorizon (0: the default)")
		leaseTTL   = flag.Duration("lease-ttl", 3*time.Second, "TTL of the lock leases (LeaseConfig.TTL)")
		syncWait   = flag.Duration("sync-timeout", 10*time.Second, "initial sync bound (circlenode.Config.SyncTimeout, caddymodule's sync_timeout)")
	)
	flag.Parse()
	offset.Store(int64(*off))
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if *name == "" || *dir == "" || *secretFile == "" || *ctl == "" {
		fmt.Fprintln(os.Stderr, "faultnode: -name, -dir, -secret-file and -ctl are required")
		os.Exit(2)
	}
	b, err := os.ReadFile(*secretFile)
	if err != nil {
		fatal(log, "reading secret", err)
	}
	secret, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(secret) != 32 {
		fatal(log, "decoding secret", fmt.Errorf("want base64 of 32 bytes: %v", err))
	}
	var seeds []string
	for _, s := range strings.Split(*join, ",") {
		if s = strings.TrimSpace(s); s != "" {
			seeds = append(seeds, s)
		}
	}
	log = log.With("node", *name)
	log.Info("faultnode starting", "wire", wireBuild, "listen", *listen, "join", seeds, "offset", *off, "replicas", *replicas)

	rc := replicator.DefaultConfig()
	rc.Name = *name
	rc.DataDir = *dir
	rc.Secret = secret
	rc.BindAddr = *listen
	rc.AdvertiseAddr = *advertise
	rc.Join = seeds
	rc.Replicas = *replicas
	rc.AckTimeout = *ackTimeout
	circlenode.IdentityBuckets(&rc)
	rc.Logger = log.With("component", "replicator")
	rc.Now = now
	if *horizon > 0 {
		rc.TombstoneHorizon = *horizon
	}

	ic := identity.Config{
		Domain: *domain,
		Secret: secret,
		Logger: log.With("component", "identity"),
		// Now left nil: circlenode.Open gives identity the replicator's
		// Node.Now, which includes the offset (rc.Now) and follows the
		// circle's median clock when this node's is slow, as in caddy.
		// Cheaper hashes than the product's (19 MiB, t=2): the suite checks
		// replication, not password hashing, and shares 2 cores.
		Argon2Memory: 4 * 1024,
		Argon2Time:   1,
	}
	cn, err := circlenode.Open(circlenode.Config{
		Replicator:  rc,
		Identity:    ic,
		SyncTimeout: *syncWait,
		Listen:      *listen,
		Advertise:   *advertise,
		Logger:      log,
	})
	if err != nil {
		fatal(log, "opening node", err)
	}

	os.Remove(*ctl)
	ln, err := net.Listen("unix", *ctl)
	if err != nil {
		fatal(log, "control socket", err)
	}
	n := &node{name: *name, cn: cn, mesh: cn.Mesh(), repl: cn.Replicator(), ident: cn.Identity()}
	n.leases = replicator.NewLeases(n.repl, replicator.LeaseConfig{
		Owner: *name + "/" + randomSuffix(), // a new holder per process, as caddymodule.Storage
		TTL:   *leaseTTL,
		Poll:  *leaseTTL / 10,
		OnLost: func(lock string, err error) {
			log.Warn("lock lease lost", "lock", lock, "error", err)
		},
	})
	srv := &http.Server{Handler: newControl(n, log), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	log.Info("faultnode ready", "advertise", n.mesh.Addr().String())

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	log.Info("faultnode stopping")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	srv.Shutdown(ctx)
	cancel()
	n.leases.Close()
	if err := cn.Close(); err != nil {
		log.Warn("closing node", "error", err)
	}
}

// node is what the control API uses of the circlenode.Node.
type node struct {
	name  string
	cn    *circlenode.Node
	mesh  *relay.Mesh
	repl  *replicator.Node
	ident *identity.Service
	// leases is the process's one lock holder, as caddymodule.Storage has
	// one per storage instance.
	leases *replicator.Leases
}

func fatal(log *slog.Logger, what string, err error) {
	log.Error(what, "error", err)
	os.Exit(1)
}

// ---- control API ----

type control struct {
	n   *node
	log *slog.Logger
	// finished counts /lock/finish calls: an order that sees it change
	// ends its hold early (the driver stops its workloads).
	finished atomic.Int64
}

func newControl(n *node, log *slog.Logger) http.Handler {
	c := &control{n: n, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", c.health)
	mux.HandleFunc("POST /kv/put", write(func(ctx context.Context, q kvReq) error {
		return c.n.repl.Put(ctx, q.Bucket, q.Key, []byte(q.Value))
	}))
	mux.HandleFunc("POST /kv/get", c.kvGet)
	mux.HandleFunc("POST /kv/delete", write(func(ctx context.Context, q kvReq) error {
		return c.n.repl.Delete(ctx, q.Bucket, q.Key)
	}))
	mux.HandleFunc("GET /dump", c.dump)
	mux.HandleFunc("GET /members", c.members)
	mux.HandleFunc("GET /stats", c.stats)
	mux.HandleFunc("POST /clock", c.setClock)
	mux.HandleFunc("GET /clock", c.getClock)
	mux.HandleFunc("POST /acct/create", c.acctCreate)
	mux.HandleFunc("POST /acct/disable", c.acctSet("disable"))
	mux.HandleFunc("POST /acct/enable", c.acctSet("enable"))
	mux.HandleFunc("POST /acct/password", c.acctSet("password"))
	mux.HandleFunc("POST /acct/groups", c.acctSet("groups"))
	mux.HandleFunc("POST /acct/login", c.acctLogin)
	mux.HandleFunc("POST /acct/probe", c.acctProbe)
	mux.HandleFunc("POST /session/issue", c.sessionIssue)
	mux.HandleFunc("POST /session/revoke", write(func(ctx context.Context, q sidReq) error {
		return c.n.ident.RevokeSession(ctx, q.SID)
	}))
	mux.HandleFunc("POST /session/revoke-all", write(func(ctx context.Context, q acctReq) error {
		return c.n.ident.RevokeAll(ctx, q.ID)
	}))
	mux.HandleFunc("POST /session/verify", c.sessionVerify)
	mux.HandleFunc("POST /lock/order", c.lockOrder)
	mux.HandleFunc("POST /lock/finish", c.lockFinish)
	return mux
}

// Result is the answer to every write: Type is "ok" (acknowledged as the
// API promises), "info" (indeterminate: stored here but not acknowledged by
// replicas in time, or the call's own deadline passed) or "fail" (nothing
// was done).
type Result struct {
	Type  string `json:"type"`
	Error string `json:"error,omitempty"`
}

// opTimeout bounds one operation of the control API.
const opTimeout = 15 * time.Second

func classify(err error) Result {
	switch {
	case err == nil:
		return Result{Type: "ok"}
	case errors.Is(err, replicator.ErrAckTimeout), errors.Is(err, context.DeadlineExceeded):
		return Result{Type: "info", Error: err.Error()}
	default:
		return Result{Type: "fail", Error: err.Error()}
	}
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	d := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
		return false
	}
	return true
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func (c *control) health(w http.ResponseWriter, r *http.Request) {
	reply(w, map[string]any{"name": c.n.name, "advertise": c.n.mesh.Addr().String(), "wire": wireBuild})
}

// write serves a request whose body decodes into Q and that is one write
// of the node, bounded by opTimeout, answered by classify.
func write[Q any](do func(ctx context.Context, q Q) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var q Q
		if !decode(w, r, &q) {
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), opTimeout)
		defer cancel()
		reply(w, classify(do(ctx, q)))
	}
}

type sidReq struct {
	SID string `json:"sid"`
}

type kvReq struct {
	Bucket string `json:"bucket"`
	Key    string `json:"key"`
	Value  string `json:"value,omitempty"`
}

func (c *control) kvGet(w http.ResponseWriter, r *http.Request) {
	var q kvReq
	if !decode(w, r, &q) {
		return
	}
	rec, err := c.n.repl.Get(q.Bucket, q.Key)
	switch {
	case errors.Is(err, replicator.ErrNotFound):
		reply(w, map[string]any{"type": "ok", "found": false})
	case err != nil:
		reply(w, Result{Type: "fail", Error: err.Error()})
	default:
		reply(w, map[string]any{"type": "ok", "found": true, "value": string(rec.Value), "version": rec.Version.String()})
	}
}

// DumpRecord is one record in a dump, live or a tombstone.
type DumpRecord struct {
	Bucket  string `json:"bucket"`
	Key     string `json:"key"`
	Version string `json:"version"`
	WallMS  int64  `json:"wall_ms"`           // the version's wall time (unix ms)
	Deleted bool   `json:"deleted,omitempty"` // a tombstone
	Hash    string `json:"hash,omitempty"`    // first 8 bytes of SHA-256(value), hex
	Value   string `json:"value,omitempty"`   // the value itself for the workload buckets
}

// Dump is a node's full state: every record of the known buckets, tombstones
// included (replicator.Node.ListWithTombstones), with its version, plus the
// counts of live records and tombstones over all buckets.
type Dump struct {
	Node       string       `json:"node"`
	Records    []DumpRecord `json:"records"`
	Live       int          `json:"live"`
	Tombstones int          `json:"tombstones"`
	Buckets    int          `json:"buckets"`
}

// dumpBuckets are every bucket the node writes: identity's and the
// workloads'.
var dumpBuckets = []string{"accounts", "usernames", "sessions", "revocations", "keys", "invites", "throttle", "reg", "set",
	"locks", "lockgrants", "lockvoters"}

func (c *control) dump(w http.ResponseWriter, r *http.Request) {
	d := Dump{Node: c.n.name}
	for _, b := range dumpBuckets {
		recs, err := c.n.repl.ListWithTombstones(b, "")
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		for _, rec := range recs {
			dr := DumpRecord{Bucket: b, Key: rec.Key, Version: rec.Version.String(), WallMS: rec.Version.WallTime().UnixMilli(), Deleted: rec.Deleted}
			if !rec.Deleted {
				h := sha256.Sum256(rec.Value)
				dr.Hash = hex.EncodeToString(h[:8])
				if b == "reg" || b == "set" {
					dr.Value = string(rec.Value)
				}
			}
			d.Records = append(d.Records, dr)
		}
	}
	st := c.n.repl.Stats()
	d.Live, d.Tombstones, d.Buckets = st.Records, st.Tombstones, st.Buckets
	reply(w, d)
}

func (c *control) members(w http.ResponseWriter, r *http.Request) { reply(w, c.n.repl.Members()) }
func (c *control) stats(w http.ResponseWriter, r *http.Request)   { reply(w, c.n.repl.Stats()) }

func (c *control) setClock(w http.ResponseWriter, r *http.Request) {
	var q struct {
		Offset string `json:"offset"`
	}
	if !decode(w, r, &q) {
		return
	}
	d, err := time.ParseDuration(q.Offset)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	old := time.Duration(offset.Swap(int64(d)))
	c.log.Info("clock offset changed", "from", old, "to", d)
	reply(w, map[string]string{"offset": d.String()})
}

func (c *control) getClock(w http.ResponseWriter, r *http.Request) {
	reply(w, map[string]any{"offset": time.Duration(offset.Load()).String(), "now": now()})
}

type acctReq struct {
	ID       string   `json:"id,omitempty"`
	Username string   `json:"username,omitempty"`
	Password string   `json:"password,omitempty"`
	Groups   []string `json:"groups,omitempty"`
}

func (c *control) acctCreate(w http.ResponseWriter, r *http.Request) {
	var q acctReq
	if !decode(w, r, &q) {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), opTimeout)
	defer cancel()
	a, err := c.n.ident.CreateAccount(ctx, identity.NewAccount{Username: q.Username, Password: q.Password, Groups: q.Groups})
	res := classify(err)
	if res.Type == "info" && a.ID == "" {
		res.Type = "fail"
	}
	reply(w, map[string]any{"type": res.Type, "error": res.Error, "id": a.ID})
}

func (c *control) acctSet(what string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var q acctReq
		if !decode(w, r, &q) {
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), opTimeout)
		defer cancel()
		var err error
		switch what {
		case "disable":
			err = c.n.ident.SetDisabled(ctx, q.ID, true)
		case "enable":
			err = c.n.ident.SetDisabled(ctx, q.ID, false)
		case "password":
			err = c.n.ident.SetPassword(ctx, q.ID, q.Password)
		case "groups":
			err = c.n.ident.SetGroups(ctx, q.ID, q.Groups)
		}
		reply(w, classify(err))
	}
}

func (c *control) acctLogin(w http.ResponseWriter, r *http.Request) {
	var q acctReq
	if !decode(w, r, &q) {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), opTimeout)
	defer cancel()
	a, err := c.n.ident.Login(ctx, q.Username, q.Password, "198.51.100.7")
	out := map[string]any{"type": "ok", "ok": err == nil, "id": a.ID}
	switch {
	case err == nil:
	case errors.Is(err, identity.ErrBadCredentials):
		out["error"] = "bad_credentials"
	case errors.Is(err, identity.ErrThrottled):
		out["error"] = "throttled"
	default:
		out["type"], out["error"] = "fail", err.Error()
	}
	reply(w, out)
}

// acctProbe reads an account record as stored here and tells which of the
// candidate passwords its hash matches (-1: none), without Login's
// throttling and disabled rule, so a checker can tell the fields apart.
func (c *control) acctProbe(w http.ResponseWriter, r *http.Request) {
	var q struct {
		ID        string   `json:"id"`
		Passwords []string `json:"passwords"`
	}
	if !decode(w, r, &q) {
		return
	}
	rec, err := c.n.repl.Get("accounts", q.ID)
	if errors.Is(err, replicator.ErrNotFound) {
		reply(w, map[string]any{"found": false})
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	var a struct {
		Disabled     bool     `json:"disabled"`
		Groups       []string `json:"groups"`
		PasswordHash string   `json:"password_hash"`
	}
	if err := json.Unmarshal(rec.Value, &a); err != nil {
		http.Error(w, "account record: "+err.Error(), http.StatusInternalServerError)
		return
	}
	match := -1
	for i, pw := range q.Passwords {
		if ok, err := verifyPHC(pw, a.PasswordHash); err == nil && ok {
			match = i
			break
		}
	}
	reply(w, map[string]any{"found": true, "disabled": a.Disabled, "groups": a.Groups, "match": match, "version": rec.Version.String()})
}

func (c *control) sessionIssue(w http.ResponseWriter, r *http.Request) {
	var q acctReq
	if !decode(w, r, &q) {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), opTimeout)
	defer cancel()
	tok, sess, err := c.n.ident.IssueSession(ctx, identity.Account{ID: q.ID}, "faults", "198.51.100.7")
	res := classify(err)
	if res.Type == "info" {
		// The session record was stored here but a token was not returned:
		// nothing the caller can use.
		res.Type = "fail"
	}
	reply(w, map[string]any{"type": res.Type, "error": res.Error, "token": tok, "sid": sess.ID})
}

func (c *control) sessionVerify(w http.ResponseWriter, r *http.Request) {
	var q struct {
		Token string `json:"token"`
	}
	if !decode(w, r, &q) {
		return
	}
	_, err := c.n.ident.Verify(q.Token)
	out := map[string]any{"valid": err == nil}
	switch {
	case err == nil:
	case errors.Is(err, identity.ErrRevoked):
		out["error"] = "revoked"
	case errors.Is(err, identity.ErrExpired):
		out["error"] = "expired"
	case errors.Is(err, identity.ErrNotStarted):
		out["error"] = "not_running"
	default:
		out["error"] = "invalid: " + err.Error()
	}
	reply(w, out)
}

// ---- locks ----

// lockFinish makes the orders in progress end their holds now.
func (c *control) lockFinish(w http.ResponseWriter, r *http.Request) {
	c.finished.Add(1)
	reply(w, map[string]string{"type": "ok"})
}

// lockOrder simulates a certmagic ACME order: Lock the name (waiting up to
// Wait), hold it for Hold while renewing every Renew (as certmagic's
// RenewLockLease), then Unlock. It reports the hold interval as this holder
// saw it, in real time (time.Now without the offset: every process of the
// suite runs on one machine, so intervals of different nodes compare):
// from Lock's return to the Unlock call, or, if the lease was lost, to the
// first moment Held reported false or Renew said ErrLeaseLost /
// ErrLeaseNotHeld (Held is sampled every 20 ms, far below the TTL/20 margin
// by which acceptors outlast the holder's belief). The holder stops working
// on the order as soon as it sees the lease lost.
func (c *control) lockOrder(w http.ResponseWriter, r *http.Request) {
	var q struct {
		Name  string `json:"name"`
		Wait  string `json:"wait"`
		Hold  string `json:"hold"`
		Renew string `json:"renew"`
	}
	if !decode(w, r, &q) {
		return
	}
	wait, err1 := time.ParseDuration(q.Wait)
	hold, err2 := time.ParseDuration(q.Hold)
	every, err3 := time.ParseDuration(q.Renew)
	if err := errors.Join(err1, err2, err3); err != nil || every <= 0 {
		http.Error(w, fmt.Sprintf("bad durations: %v", err), http.StatusBadRequest)
		return
	}
	type renewal struct {
		AtNS  int64  `json:"at_ns"`
		Error string `json:"error,omitempty"`
	}
	out := struct {
		Type     string    `json:"type"` // ok: held and released or lost; fail: not taken
		Error    string    `json:"error,omitempty"`
		StartNS  int64     `json:"start_ns,omitempty"`
		EndNS    int64     `json:"end_ns,omitempty"`
		Lost     bool      `json:"lost,omitempty"`
		Renewals []renewal `json:"renewals,omitempty"`
	}{}
	gen := c.finished.Load()
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	err := c.n.leases.Lock(ctx, q.Name)
	cancel()
	if err != nil {
		out.Type, out.Error = "fail", err.Error()
		reply(w, out)
		return
	}
	start := time.Now()
	out.Type, out.StartNS = "ok", start.UnixNano()
	sample := time.NewTicker(20 * time.Millisecond)
	defer sample.Stop()
	nextRenew := start.Add(every)
	end := start.Add(hold)
	// Renewals run beside the sampling, so a renewal that waits for
	// acknowledgements does not hide the moment the lease ends.
	renewed := make(chan renewal, 1)
	renewing := false
	lost := func(at time.Time) {
		out.Lost, out.EndNS = true, at.UnixNano()
		c.log.Warn("lock order: lease no longer held", "lock", q.Name, "held_for", at.Sub(start))
	}
loop:
	for {
		select {
		case rn := <-renewed:
			renewing = false
			out.Renewals = append(out.Renewals, rn)
			if rn.Error != "" && (strings.Contains(rn.Error, replicator.ErrLeaseLost.Error()) || strings.Contains(rn.Error, replicator.ErrLeaseNotHeld.Error())) {
				lost(time.Now())
				break loop
			}
			continue
		case <-sample.C:
		}
		now := time.Now()
		if !c.n.leases.Held(q.Name) {
			lost(now)
			break
		}
		if !now.Before(end) || c.finished.Load() != gen {
			out.EndNS = now.UnixNano() // the holder stops working here, then releases
			if renewing {
				<-renewed
			}
			uctx, ucancel := context.WithTimeout(context.Background(), opTimeout)
			if err := c.n.leases.Unlock(uctx, q.Name); err != nil {
				out.Error = "unlock: " + err.Error()
				out.Lost = errors.Is(err, replicator.ErrLeaseLost) || errors.Is(err, replicator.ErrLeaseNotHeld)
			}
			ucancel()
			break
		}
		if !renewing && !now.Before(nextRenew) {
			nextRenew = nextRenew.Add(every)
			renewing = true
			go func() {
				rctx, rcancel := context.WithTimeout(context.Background(), every)
				err := c.n.leases.Renew(rctx, q.Name, 0)
				rcancel()
				rn := renewal{AtNS: time.Now().UnixNano()}
				if err != nil {
					rn.Error = err.Error()
				}
				renewed <- rn
			}()
		}
	}
	if renewing && out.Lost {
		go func() { <-renewed }()
	}
	reply(w, out)
}

func randomSuffix() string {
	var b [4]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
