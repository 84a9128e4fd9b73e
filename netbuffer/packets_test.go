package netbuffer

import (
	"encoding/binary"
	"net"
	"net/netip"
)

// Hand-built Ethernet frames for the tests: ARP, IPv4 with UDP or ICMP
// echo. Only what the tests need; no options, no fragments.

const (
	etherTypeIPv4 = 0x0800
	etherTypeARP  = 0x0806
	ethHeaderLen  = 14
	minFrameLen   = 60 // without the FCS, which taps do not carry

	arpRequest = 1
	arpReply   = 2

	protoICMP = 1
	protoUDP  = 17
)

var broadcastMAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

func ethernet(dst, src net.HardwareAddr, etherType uint16, payload []byte) []byte {
	f := make([]byte, 0, max(ethHeaderLen+len(payload), minFrameLen))
	f = append(f, dst...)
	f = append(f, src...)
	f = binary.BigEndian.AppendUint16(f, etherType)
	f = append(f, payload...)
	for len(f) < minFrameLen {
		f = append(f, 0)
	}
	return f
}

// arpFrame builds an ARP request (op 1, to broadcast, target MAC zero) or
// reply (op 2, to tha).
func arpFrame(op uint16, sha net.HardwareAddr, spa netip.Addr, tha net.HardwareAddr, tpa netip.Addr) []byte {
	p := make([]byte, 0, 28)
	p = binary.BigEndian.AppendUint16(p, 1) // Ethernet
	p = binary.BigEndian.AppendUint16(p, etherTypeIPv4)
	p = append(p, 6, 4)
	p = binary.BigEndian.AppendUint16(p, op)
	p = append(p, sha...)
	p = append(p, spa.AsSlice()...)
	dst := tha
	if op == arpRequest {
		p = append(p, make([]byte, 6)...)
		dst = broadcastMAC
	} else {
		p = append(p, tha...)
	}
	p = append(p, tpa.AsSlice()...)
	return ethernet(dst, sha, etherTypeARP, p)
}

type arpPacket struct {
	op       uint16
	sha, tha net.HardwareAddr
	spa, tpa netip.Addr
}

func parseARP(f []byte) (arpPacket, bool) {
	if len(f) < ethHeaderLen+28 || binary.BigEndian.Uint16(f[12:]) != etherTypeARP {
		return arpPacket{}, false
	}
	p := f[ethHeaderLen:]
	if binary.BigEndian.Uint16(p[0:]) != 1 || binary.BigEndian.Uint16(p[2:]) != etherTypeIPv4 || p[4] != 6 || p[5] != 4 {
		return arpPacket{}, false
	}
	return arpPacket{
		op:  binary.BigEndian.Uint16(p[6:]),
		sha: net.HardwareAddr(p[8:14]),
		spa: netip.AddrFrom4([4]byte(p[14:18])),
		tha: net.HardwareAddr(p[18:24]),
		tpa: netip.AddrFrom4([4]byte(p[24:28])),
	}, true
}

// checksum is the Internet checksum (RFC 1071) of b.
func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

func ipv4Packet(src, dst netip.Addr, proto byte, payload []byte) []byte {
	h := make([]byte, 20, 20+len(payload))
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(payload)))
	binary.BigEndian.PutUint16(h[4:], 0x1234) // id
	binary.BigEndian.PutUint16(h[6:], 0x4000) // don't fragment
	h[8] = 64
	h[9] = proto
	copy(h[12:16], src.AsSlice())
	copy(h[16:20], dst.AsSlice())
	binary.BigEndian.PutUint16(h[10:], checksum(h))
	return append(h, payload...)
}

type ipv4Info struct {
	proto    byte
	src, dst netip.Addr
	payload  []byte
}

func parseIPv4(f []byte) (ipv4Info, bool) {
	if len(f) < ethHeaderLen+20 || binary.BigEndian.Uint16(f[12:]) != etherTypeIPv4 {
		return ipv4Info{}, false
	}
	p := f[ethHeaderLen:]
	ihl := int(p[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(p[2:]))
	if p[0]>>4 != 4 || ihl < 20 || total < ihl || total > len(p) {
		return ipv4Info{}, false
	}
	return ipv4Info{
		proto:   p[9],
		src:     netip.AddrFrom4([4]byte(p[12:16])),
		dst:     netip.AddrFrom4([4]byte(p[16:20])),
		payload: p[ihl:total],
	}, true
}

// udpDatagram builds a UDP header and payload; the checksum is left zero,
// which IPv4 allows.
func udpDatagram(srcPort, dstPort uint16, payload []byte) []byte {
	u := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(u[0:], srcPort)
	binary.BigEndian.PutUint16(u[2:], dstPort)
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	return append(u, payload...)
}

func parseUDP(p []byte) (srcPort, dstPort uint16, payload []byte, ok bool) {
	if len(p) < 8 {
		return 0, 0, nil, false
	}
	n := int(binary.BigEndian.Uint16(p[4:]))
	if n < 8 || n > len(p) {
		return 0, 0, nil, false
	}
	return binary.BigEndian.Uint16(p[0:]), binary.BigEndian.Uint16(p[2:]), p[8:n], true
}

// icmpEcho builds an ICMP echo request (typ 8) or reply (typ 0).
func icmpEcho(typ byte, id, seq uint16, data []byte) []byte {
	m := make([]byte, 8, 8+len(data))
	m[0] = typ
	binary.BigEndian.PutUint16(m[4:], id)
	binary.BigEndian.PutUint16(m[6:], seq)
	m = append(m, data...)
	binary.BigEndian.PutUint16(m[2:], checksum(m))
	return m
}
