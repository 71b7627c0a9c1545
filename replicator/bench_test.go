package replicator

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkPutAck measures acknowledged writes (Replicas 2) in a 3-node
// circle on loopback, including the fsyncs on the writer and on the peers.
func BenchmarkPutAck(b *testing.B) {
	for _, replicas := range []int{2, 3} {
		b.Run(fmt.Sprintf("replicas=%d", replicas), func(b *testing.B) {
			nodes := cluster(b, 3, func(c *Config) { c.Replicas = replicas })
			ctx := context.Background()
			value := make([]byte, 256)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := nodes[0].Put(ctx, "bench", fmt.Sprintf("k%d", i), value); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkPutAckParallel measures concurrent acknowledged writes.
func BenchmarkPutAckParallel(b *testing.B) {
	nodes := cluster(b, 3, nil)
	value := make([]byte, 256)
	var seq atomicCounter
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := seq.next()
			if err := nodes[i%3].Put(context.Background(), "bench", fmt.Sprintf("k%d", i), value); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
