package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/homecircle/circle/replicator"
)

// All-alive acknowledgements.
//
// The replicator acknowledges a write once `replicas` nodes hold it. For
// the storage that is not always enough: an ACME HTTP-01 or TLS-ALPN-01
// token must be answerable by every node before the CA is told to validate
// (the CA may ask any of them), a certificate must be everywhere before the
// lock that protected its issuance is released (so a waiting node finds it
// instead of ordering again), and a lock lease must have met every
// concurrent taker before anyone decides who holds it.
//
// So every node running `storage circle` acknowledges, through the store
// itself, each change it sees of a lock or of a certificate or challenge
// token (needsAllAlive): it writes the version it now holds to bucket
// "acks" under "<node>|<bucket>|<key>" (small records: they travel by
// gossip). A writer that needs all-alive acknowledgement waits until every
// alive member's acknowledgement of the key shows its version or a later
// one. Only members whose storage runs are waited for: each storage
// instance announces itself with a key "<node>|#<instance>" (removed when
// it stops). Nodes that are suspect, dead or gone are not waited for; a
// node that joins later gets the records by anti-entropy before it serves
// (see waitInitialSync), and acknowledges recent records when it starts.
//
// (A replicator-level "ack from every alive node" write mode would make
// this unnecessary; see docs/TLS.md.)

// bucketAcks holds the acknowledgements.
const bucketAcks = "acks"

// ackPoll is how often a waiting writer looks at the acknowledgements.
const ackPoll = 20 * time.Millisecond

// ackRecord is the value of an acknowledgement.
type ackRecord struct {
	Time uint64 `json:"t"` // replicator.Version.Time of the record held
	Node string `json:"n"` // replicator.Version.Node of the record held
}

func (a ackRecord) version() replicator.Version {
	return replicator.Version{Time: a.Time, Node: a.Node}
}

// ackKey is the key of node's acknowledgement of bucket/key.
func ackKey(node, bucket, key string) string {
	return node + "|" + bucket + "|" + key
}

// readyPrefix is the prefix of the keys by which a node's storage
// instances say they acknowledge: "<node>|#<instance>". Writers only wait
// for alive members with such a key: a node whose storage is not running
// (still starting, or not configured with `storage circle`) would never
// acknowledge, and it does not serve certificates or challenges either.
func readyPrefix(node string) string {
	return node + "|#"
}

// recentAck is how far back a starting acker acknowledges records it
// already holds (writes it may have missed while starting).
const recentAck = 2 * time.Minute

// needsAllAlive reports whether a write of key to bucket "certs" waits for
// every alive node: challenge tokens and certificates do; other keys
// (storage tests, CA, accounts, cleaning marks) only need replicas.
func needsAllAlive(key string) bool {
	return strings.HasPrefix(key, "certificates/") || strings.Contains(key, "/challenge_tokens/")
}

// ackQueue bounds the acknowledgements waiting to be written; when full,
// an acknowledgement is dropped (its writer times out, logs and goes on).
const ackQueue = 1024

// ackWriteTimeout bounds one acknowledgement write.
const ackWriteTimeout = 2 * time.Second

// startAcker makes this node acknowledge changes in the storage's
// buckets. The returned func stops it.
//
// Acknowledgements are written in order by one goroutine, as acknowledged
// writes: those go to every alive peer over streams at once, while
// gossip would take a gossip interval or more (200 ms on a LAN).
func (s *Storage) startAcker(nodeName string) (stop func()) {
	queue := make(chan replicator.Record, ackQueue)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			select {
			case <-done:
				return
			case r := <-queue:
				s.writeAck(nodeName, r)
			}
		}
	}()
	ack := func(r replicator.Record) {
		if r.Bucket == bucketCerts && !needsAllAlive(r.Key) {
			return
		}
		select {
		case queue <- r:
		default:
			s.logger.Warn("acknowledgement queue full; dropping", zap.String("key", r.Key))
		}
	}
	c1 := s.node.Watch(bucketCerts, ack)
	c2 := s.node.Watch(bucketLocks, ack)
	// Acknowledge what arrived while this node was starting, then say that
	// this instance acknowledges.
	since := time.Now().Add(-recentAck)
	for _, b := range []string{bucketCerts, bucketLocks} {
		recs, _ := s.node.List(b, "")
		for _, r := range recs {
			if r.Version.WallTime().After(since) {
				ack(r)
			}
		}
	}
	// An acknowledged write goes to every alive peer at once, so that they
	// wait for this node (and it races fairly for locks) as soon as this
	// storage is used.
	ready := readyPrefix(nodeName) + randomHex(8)
	ctx, cancel := context.WithTimeout(context.Background(), ackWriteTimeout)
	err := s.node.Put(ctx, bucketAcks, ready, []byte(time.Now().UTC().Format(time.RFC3339)))
	cancel()
	if err != nil && !errors.Is(err, replicator.ErrAckTimeout) && !errors.Is(err, context.DeadlineExceeded) {
		s.logger.Warn("announcing acknowledgements", zap.Error(err))
	}
	return func() {
		c1()
		c2()
		close(done)
		<-finished
		s.node.DeleteAsync(bucketAcks, ready)
	}
}

// writeAck records that this node holds r (or forgets the acknowledgement
// of a deleted record: nobody waits for deletions).
func (s *Storage) writeAck(nodeName string, r replicator.Record) {
	k := ackKey(nodeName, r.Bucket, r.Key)
	if len(k) > replicator.MaxKeyLen {
		return
	}
	if r.Deleted {
		if _, err := s.node.Get(bucketAcks, k); err == nil {
			s.node.DeleteAsync(bucketAcks, k)
		}
		return
	}
	b, _ := json.Marshal(ackRecord{Time: r.Version.Time, Node: r.Version.Node})
	ctx, cancel := context.WithTimeout(context.Background(), ackWriteTimeout)
	defer cancel()
	if err := s.node.Put(ctx, bucketAcks, k, b); err != nil && !errors.Is(err, replicator.ErrAckTimeout) &&
		!errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, replicator.ErrClosed) {
		s.logger.Warn("writing acknowledgement", zap.String("key", r.Key), zap.Error(err))
	}
}

// awaitAllAlive waits until every alive member other than this node that
// runs the storage holds the record bucket/key at version v or later, until
// ctx ends or timeout passes. It returns the members still missing (nil
// when all hold it), whether some member holds a later version than v, and
// how many alive members there are (running the storage or not; 0: this
// node is alone).
func (s *Storage) awaitAllAlive(ctx context.Context, bucket, key string, v replicator.Version, timeout time.Duration) (missing []string, newer bool, peers int) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(ackPoll)
	defer tick.Stop()
	self := s.node.Name()
	for {
		missing, newer, peers = missing[:0], false, 0
		for _, m := range s.node.Members() {
			if m.Name == self || m.State != "alive" {
				continue
			}
			peers++
			if r, err := s.node.List(bucketAcks, readyPrefix(m.Name)); err != nil || len(r) == 0 {
				continue // its storage does not run (yet): it cannot acknowledge
			}
			rec, err := s.node.Get(bucketAcks, ackKey(m.Name, bucket, key))
			var a ackRecord
			if err != nil || json.Unmarshal(rec.Value, &a) != nil {
				missing = append(missing, m.Name)
				continue
			}
			switch c := a.version().Compare(v); {
			case c < 0:
				missing = append(missing, m.Name)
			case c > 0:
				newer = true
			}
		}
		if len(missing) == 0 {
			return nil, newer, peers
		}
		select {
		case <-ctx.Done():
			return missing, newer, peers
		case <-deadline.C:
			return missing, newer, peers
		case <-tick.C:
		}
	}
}

// putAllAlive stores value like put and then waits (bounded by
// s.ackWait) until every alive node holds it. Missing acknowledgements are
// logged, not returned: the record is durable here and keeps replicating.
func (s *Storage) putAllAlive(ctx context.Context, bucket, key string, value []byte) (replicator.Version, error) {
	if err := s.put(ctx, bucket, key, value); err != nil {
		return replicator.Version{}, err
	}
	rec, err := s.node.Get(bucket, key)
	if err != nil {
		return replicator.Version{}, fmt.Errorf("reading back %s: %w", key, err)
	}
	if missing, _, _ := s.awaitAllAlive(ctx, bucket, key, rec.Version, s.ackWait); len(missing) > 0 {
		s.logWarnMissing(key, missing)
	}
	return rec.Version, nil
}
