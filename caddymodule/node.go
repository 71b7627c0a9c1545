package caddymodule

import (
	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/homecircle/circle/caddymodule/circlenode"
)

// nodes holds this process's circle node(s), keyed by poolKey. In practice
// there is one: the `circle` app acquires it in Provision, and a config
// reload acquires the same key before the old config releases it, so the
// node (its bbolt file, gossip sockets and identity service) survives reloads.
var nodes = caddy.NewUsagePool()

// poolKey identifies a node by what makes it a distinct node: its name and
// its data directory (one bbolt file can only be opened once).
func poolKey(name, dataDir string) string {
	return "circle-node|" + name + "|" + dataDir
}

// sharedNode is the process's circlenode.Node as a caddy.Destructor, so
// the UsagePool closes it when the last config that uses it is cleaned up.
type sharedNode struct {
	*circlenode.Node
}

// Destruct closes the node.
func (s *sharedNode) Destruct() error { return s.Close() }

// acquireNode returns the node for key, opening it on first use. Every
// successful call must be paired with nodes.Delete(key).
func acquireNode(key string, cfg circlenode.Config, logger *zap.Logger) (*sharedNode, error) {
	val, loaded, err := nodes.LoadOrNew(key, func() (caddy.Destructor, error) {
		n, err := circlenode.Open(cfg)
		if err != nil {
			return nil, err
		}
		return &sharedNode{n}, nil
	})
	if err != nil {
		return nil, err
	}
	sn := val.(*sharedNode)
	if loaded && sn.Fingerprint() != cfg.Fingerprint() {
		logger.Warn("circle node settings changed; they apply after a restart of the process, the running node is kept",
			zap.String("name", cfg.Replicator.Name))
	}
	return sn, nil
}

// Interface guards
var _ caddy.Destructor = (*sharedNode)(nil)
