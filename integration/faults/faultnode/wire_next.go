//go:build circle_nextwire

package main

// wireBuild says which wire profile this binary's replicator speaks
// (replicator/version_build_next.go: the next release).
const wireBuild = "next"
