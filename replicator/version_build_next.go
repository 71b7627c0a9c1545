//go:build circle_nextwire

package replicator

// buildWire: this is a test build (tag circle_nextwire) whose nodes play
// the next release of the wire protocol (nextWire).
var buildWire = nextWire
