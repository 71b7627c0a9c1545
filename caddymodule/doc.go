// Package caddymodule wires Circle into Caddy: the circle app, the
// circle_portal and circle_auth handlers, the circle storage module, the
// admin API and the caddy circle subcommands. It is the only package that
// imports Caddy together with identity, replicator and relay.
package caddymodule
