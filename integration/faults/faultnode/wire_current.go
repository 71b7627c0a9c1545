//go:build !circle_nextwire

package main

// wireBuild says which wire profile this binary's replicator speaks.
const wireBuild = "current"
