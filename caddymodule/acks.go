package caddymodule

import (
	"context"
	"errors"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/homecircle/circle/replicator"
)

// All-alive acknowledgement.
//
// The replicator acknowledges an ordinary write once `replicas` nodes hold
// it. For the storage that is not always enough: an ACME HTTP-01 or
// TLS-ALPN-01 token must be answerable by every node before the CA is told
// to validate (the CA may ask any of them), a certificate must be
// everywhere before the lock that protected its issuance is released (so a
// waiting node finds it instead of ordering again). Those writes use
// replicator.PutAll, acknowledged by every alive node. Nodes that
// are suspect, dead or gone are not waited for; a node that joins later gets
// the records by anti-entropy before it serves (see waitInitialSync).

// needsAllAlive reports whether a write of key to bucket "certs" waits for
// every alive node: challenge tokens, certificates and the pki CA files
// (created under a lock, see castart.go) do; other keys (storage tests,
// accounts, cleaning marks) only need replicas.
func needsAllAlive(key string) bool {
	if _, _, _, ok := caFile(key); ok {
		return true
	}
	return strings.HasPrefix(key, "certificates/") || strings.Contains(key, "/challenge_tokens/")
}

// putAll stores value under bucket/key and waits, at most wait, until every
// alive node holds it. Running out of time is logged, not returned: the
// record is durable here and keeps replicating.
func (s *Storage) putAll(ctx context.Context, bucket, key string, value []byte, wait time.Duration) error {
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err := s.node.PutAll(wctx, bucket, key, value)
	if errors.Is(err, replicator.ErrAckTimeout) || (errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil) {
		s.logger.Warn("not every alive node acknowledged the write in time; it keeps replicating",
			zap.String("key", key), zap.Duration("waited", wait))
		return nil
	}
	return err
}
