package replicator

import (
	"sync/atomic"
	"time"
)

// aeState is the anti-entropy and garbage-collection state of a Node.
type aeState struct {
	metaBytes atomic.Uint64 // anti-entropy metadata bytes sent (everything but records)
	metaKeys  atomic.Uint64 // keys listed in anti-entropy metadata sent
}

// countMeta counts an anti-entropy metadata message sent.
func (n *Node) countMeta(msg []byte, keys int) {
	n.ae.metaBytes.Add(uint64(len(msg)))
	n.ae.metaKeys.Add(uint64(keys))
}

// collectGarbage removes tombstones older than the horizon and returns how
// many it removed. Not implemented yet.
func (n *Node) collectGarbage() (int, error) { return 0, nil }

// aeStats fills the anti-entropy and garbage-collection fields of s.
func (n *Node) aeStats(s *Stats) {
	s.AntiEntropyMetaBytes = n.ae.metaBytes.Load()
	s.AntiEntropyMetaKeys = n.ae.metaKeys.Load()
}

// DefaultTombstoneHorizon is how long tombstones are kept.
const DefaultTombstoneHorizon = 72 * time.Hour

// tombstoneHorizon returns the horizon after which tombstones are removed.
func (cfg Config) tombstoneHorizon() time.Duration { return DefaultTombstoneHorizon }
