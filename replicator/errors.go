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

	// ErrInvalid: a bad argument (bucket, key, value or configuration).
	ErrInvalid = errors.New("replicator: invalid argument")

	// ErrDataFormat: the data directory was written by a newer build (a
	// higher format than DataFormat) and is left untouched.
	ErrDataFormat = errors.New("replicator: unsupported data format")
)
