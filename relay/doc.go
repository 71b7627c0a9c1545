// Package relay gives every node of a circle a path to every other node
// across home NATs: STUN, hole punching, TURN relays (pion/turn/v2) and one
// authenticated QUIC connection per peer. It imports no Caddy packages.
package relay
