// Package replicator is Circle's durable replicated key/value store.
//
// Every node keeps all records in a local bbolt file (DataDir/circle.db);
// each write is fsynced before it is acknowledged. Records live in buckets
// and are versioned by a hybrid logical clock (HLC, see Version); between
// two versions of a key the higher one wins (last writer wins), deletes are
// tombstones. Buckets named in Config.FirstWriterWins keep the earlier of two
// live records instead (a tombstone still beats an older live record).
// Buckets named in Config.Merge join two live records with a MergeFunc
// (merge.go): records several nodes edit keep every node's edits.
// A version more than Config.MaxClockSkew ahead of this node's wall clock
// is refused and kept aside until the clock catches up (skew.go), so a
// node with a fast clock neither wins conflicts early nor drags the
// others' clocks forward; Members reports each peer's measured offset.
//
// Nodes find each other with hashicorp/memberlist (SWIM gossip), keyed with
// a key derived from the circle secret, so a node with another secret can
// neither join nor read anything. Records travel three ways:
//
//   - small records (under about 1 KB encoded) as memberlist broadcasts;
//   - acknowledged writes (Put, Delete) also directly to every alive peer
//     over an authenticated, encrypted stream; the call returns once
//     Config.Replicas nodes (or every alive node, if fewer) hold the record,
//     or fails with ErrAckTimeout after Config.AckTimeout; the record is kept;
//   - anti-entropy: every Config.AntiEntropyInterval, and at once when a
//     peer joins, a node compares per-bucket digests (XOR of hashes of
//     key+version over 256 hash ranges of the key) with one random peer and
//     then ships only the records that differ, both ways. Its cost grows with
//     the difference between the two nodes, not with the data size.
//
// Streams run over memberlist's transport (TCP by default, or the one in
// Config.Transport), multiplexed by a leading byte; the wire format is
// documented in wire.go.
//
// Watch callbacks run serially on one goroutine per Node, never under the
// Node's locks.
//
// Member states: memberlist's public API only tells which nodes are live,
// so Members reports "suspect" for a live peer that no direct probe reached
// for a while, "left" for a peer that announced its departure (Close sends
// msgLeave to every peer before leaving, so writes stop waiting for it at
// once) and "dead" for one memberlist declared gone without such notice.
//
// Healing: memberlist never contacts a node again once it has been dead
// for GossipToTheDeadTime, so a node keeps joining, forever and with
// backoff, every member it ever knew (at its last known address, stored
// in the database) and every Join seed (resolved anew) that it is not in
// contact with; two halves of a split circle merge as soon as one attempt
// crosses (heal.go).
//
// Not done yet: tombstones are kept forever (no garbage collection past a
// horizon); values are stored as given (callers encrypt sensitive values).
package replicator
