package relay

import (
	"encoding/binary"
	"fmt"
	"time"
)

// SendRawHello sends a hello with the given header version and JSON body
// on the live connection to peer, as a node of another release would.
func (m *Mesh) SendRawHello(peer string, version byte, body []byte) error {
	m.mu.Lock()
	conns := m.conns[peer]
	m.mu.Unlock()
	if len(conns) == 0 {
		return fmt.Errorf("no connection to %s", peer)
	}
	s, err := conns[len(conns)-1].qc.OpenUniStream()
	if err != nil {
		return err
	}
	buf := []byte{version, uniHello}
	buf = binary.BigEndian.AppendUint16(buf, uint16(len(body)))
	buf = append(buf, body...)
	s.SetWriteDeadline(time.Now().Add(headerWait))
	if _, err := s.Write(buf); err != nil {
		return err
	}
	return s.Close()
}
