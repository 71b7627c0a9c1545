package replicator

import (
	"context"
	"errors"
)

// Ack tells how many copies an acknowledged write has.
type Ack struct {
	Copies int // nodes known to hold the record (or a later version), this one included
	Want   int // nodes the write asked for (Config.Replicas)
}

// Full reports whether the write has the copies it asked for.
func (a Ack) Full() bool { return a.Copies >= a.Want }

// PutWithAck is Put that also reports how many copies the record has.
func (n *Node) PutWithAck(ctx context.Context, bucket, key string, value []byte) (Ack, error) {
	return Ack{}, errors.New("replicator: PutWithAck not implemented")
}

// DeleteWithAck is Delete that also reports how many copies the tombstone has.
func (n *Node) DeleteWithAck(ctx context.Context, bucket, key string) (Ack, error) {
	return Ack{}, errors.New("replicator: DeleteWithAck not implemented")
}
