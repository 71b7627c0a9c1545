//go:build !circle_nextwire

package replicator

// buildWire is what nodes of this build speak unless Config.wire says
// otherwise. Build with -tags circle_nextwire for the next-wire profile.
var buildWire = currentWire
