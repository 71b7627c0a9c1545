package replicator

import "errors"

// Sentinel errors. Errors returned by this package wrap them, so test with
// errors.Is.
var (
	// ErrNotFound: the record is absent or tombstoned.
	ErrNotFound = errors.New("replicator: not found")

	// ErrAckTimeout: the write is durable on this node but not enough nodes
	// acknowledged it within Config.AckTimeout. The record is kept and keeps
	// replicating (gossip and anti-entropy).
	ErrAckTimeout = errors.New("replicator: acknowledgement timeout")

	// ErrClosed: the Node is closed.
	ErrClosed = errors.New("replicator: node closed")

	// ErrClockSkew: clocks disagree by more than Config.MaxClockSkew. Put
	// and Delete return it (with ErrAckTimeout) when peers refused the
	// record because this node's clock is ahead of theirs, and when the
	// key's stored version is further ahead of this node's clock than
	// that (the write would lose to it).
	ErrClockSkew = errors.New("replicator: clock skew beyond the maximum")

	// ErrInvalid: a bad argument (bucket, key, value or configuration).
	ErrInvalid = errors.New("replicator: invalid argument")

	// ErrDataFormat: the data directory was written by a newer build (a
	// higher format than DataFormat) and is left untouched.
	ErrDataFormat = errors.New("replicator: unsupported data format")
)
