using System.Buffers.Binary;
using ActorVmm.Devices.Virtio;
using ActorVmm.LibVmm;
using static ActorVmm.Devices.Virtio.VirtqFlags;

namespace ActorVmm.Devices.Tests.Virtio;

/// <summary>A host link for one model test: frames the host has for the guest are queued, frames the
/// device sends are recorded, and it can refuse to send.</summary>
internal sealed class FakeNetBackend : INetBackend
{
    public Queue<byte[]> Incoming { get; } = new();
    public List<byte[]> Sent { get; } = [];
    public List<NetOffloads> OffloadCalls { get; } = [];
    public bool Refuse { get; set; }

    public bool Send(ReadOnlySpan<byte> headerAndFrame)
    {
        if (Refuse) return false;
        Sent.Add(headerAndFrame.ToArray());
        return true;
    }

    public int TryReceive(Span<byte> buffer)
    {
        if (!Incoming.TryDequeue(out var frame)) return 0;
        frame.AsSpan(0, Math.Min(frame.Length, buffer.Length)).CopyTo(buffer);
        return frame.Length;
    }

    public void SetReceiveOffloads(NetOffloads offloads) => OffloadCalls.Add(offloads);

    public void Dispose() { }
}

/// <summary>
/// virtio-net (virtio 1.2 §5.1) with its receiveq and transmitq built in <see cref="TestGuestMemory"/>
/// as a driver would, over <see cref="FakeNetBackend"/>.
/// </summary>
public sealed class VirtioNetTests
{
    private const ushort Size = 16;
    private const ulong Data = 0x4_0000;
    private static readonly MacAddress Mac = new(0x5254_0012_3456);
    private const ulong Basic = VirtioFeatures.Version1 | VirtioFeatures.EventIdx | VirtioNetFeatures.Mac | VirtioNetFeatures.Status;
    private const ulong Merged = Basic | VirtioNetFeatures.MrgRxbuf;

    private readonly TestGuestMemory _m = new();
    private readonly DriverRing _rx;
    private readonly DriverRing _tx;
    private readonly FakeNetBackend _backend = new();
    private ulong _features = Basic;
    private VirtioNet _net;
    private SplitVirtqueue _rxq;
    private SplitVirtqueue _txq;
    private ushort _nextTxDesc;

    public VirtioNetTests()
    {
        _rx = new DriverRing(_m, Size);
        _tx = new DriverRing(_m, Size, desc: 0x1_8000, avail: 0x2_8000, used: 0x3_8000);
        _net = new VirtioNet(_m, _backend, Mac, () => _features);
        _rxq = Enable(_rx);
        _txq = Enable(_tx);
    }

    private SplitVirtqueue Enable(DriverRing r) =>
        SplitVirtqueue.Enable(new GuestRam(_m), r.Size, new GuestPhysAddr(r.Desc), new GuestPhysAddr(r.Avail),
            new GuestPhysAddr(r.Used), _features);

    private void Receive() => _net.Process(VirtioNet.ReceiveQueue, _rxq);

    private void Transmit() => _net.Process(VirtioNet.TransmitQueue, _txq);

    /// <summary>Posts a one-descriptor receive buffer (descriptor <paramref name="index"/>).</summary>
    private void PostReceive(ushort index, ulong at, uint length)
    {
        _m.Fill(at, (int)length + 1, 0xEE);
        _rx.SetDesc(index, at, length, DescWrite);
        _rx.MakeAvailable(index);
    }

    /// <summary>A virtio_net_hdr then an Ethernet frame of <paramref name="frameLength"/> bytes whose bytes
    /// are <paramref name="tag"/> + their position.</summary>
    private static byte[] Packet(int frameLength, byte tag, byte flags = 0, byte gso = 0, ushort csumStart = 0, ushort csumOffset = 0)
    {
        var p = new byte[VirtioNetHeader.Size + frameLength];
        p[0] = flags;
        p[1] = gso;
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(6), csumStart);
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(8), csumOffset);
        for (var i = 0; i < frameLength; i++) p[VirtioNetHeader.Size + i] = (byte)(tag + i);
        return p;
    }

    private static byte[] Frame(byte[] packet) => packet[VirtioNetHeader.Size..];

    /// <summary>Puts <paramref name="bytes"/> in guest memory at <paramref name="at"/> and makes it a
    /// transmit chain of buffers of the given sizes (the rest in a last buffer).</summary>
    private ushort PostTransmit(ulong at, byte[] bytes, params int[] pieces)
    {
        Assert.True(_m.TryWrite(new GuestPhysAddr(at), bytes));
        var sizes = pieces.Length == 0 ? [bytes.Length] : pieces.Append(bytes.Length - pieces.Sum()).ToArray();
        var head = _nextTxDesc;
        var offset = 0UL;
        for (var i = 0; i < sizes.Length; i++)
        {
            var last = i == sizes.Length - 1;
            _tx.SetDesc(_nextTxDesc, at + offset, (uint)sizes[i], last ? (ushort)0 : DescNext, (ushort)(_nextTxDesc + 1));
            offset += (ulong)sizes[i];
            _nextTxDesc++;
        }
        _tx.MakeAvailable(head);
        return head;
    }

    private ushort NumBuffers(ulong at) => _m.U16(at + VirtioNetHeader.NumBuffersOffset);

    // ---------------------------------------------------------------- identity and configuration

    [Fact]
    public void Identifies_as_a_network_card_with_a_receive_and_a_transmit_queue_its_mac_and_the_link_up()
    {
        Assert.Equal(1, _net.DeviceId);
        Assert.Equal([VirtioNet.QueueSize, VirtioNet.QueueSize], _net.QueueMaxSizes);
        Assert.Equal(VirtioNetFeatures.Csum | VirtioNetFeatures.GuestCsum | VirtioNetFeatures.Mac | VirtioNetFeatures.GuestTso4
            | VirtioNetFeatures.GuestTso6 | VirtioNetFeatures.HostTso4 | VirtioNetFeatures.HostTso6 | VirtioNetFeatures.MrgRxbuf
            | VirtioNetFeatures.Status, _net.Features);
        Assert.Equal(0x0001_5634_1200_5452UL, _net.ReadConfig(0, 8)); // mac 52:54:00:12:34:56, then status
        Assert.Equal(0x52UL, _net.ReadConfig(0, 1));
        Assert.Equal(0x5634UL, _net.ReadConfig(4, 2));
        Assert.Equal((ulong)VirtioNet.StatusLinkUp, _net.ReadConfig(6, 2));
        Assert.Equal(0UL, _net.ReadConfig(10, 2)); // mtu: VIRTIO_NET_F_MTU not offered
        Assert.Equal(0UL, _net.ReadConfig(VirtioNet.ConfigSize, 4));
        _net.WriteConfig(0, 4, 0xFFFF_FFFF);
        Assert.Equal(0x52UL, _net.ReadConfig(0, 1));
    }

    [Fact]
    public void A_generated_mac_is_unicast_and_locally_administered_and_a_multicast_one_is_refused()
    {
        var random = new Random(7);
        for (var i = 0; i < 64; i++)
        {
            var mac = MacAddress.GenerateLocal(random);
            Assert.False(mac.IsMulticast);
            Assert.True(mac.IsLocallyAdministered);
            Assert.True(MacAddress.TryParse(mac.ToString(), out var back));
            Assert.Equal(mac, back);
        }
        Assert.Equal("52:54:00:12:34:56", Mac.ToString());
        Assert.Throws<ArgumentException>(() => new VirtioNet(_m, _backend, new MacAddress(0x0100_5E00_0001), () => 0));
    }

    // ---------------------------------------------------------------- transmit

    [Fact]
    public void A_transmitted_frame_reaches_the_backend_behind_its_header_and_the_chain_returns_with_length_zero()
    {
        var p = Packet(60, 0x10);
        PostTransmit(Data, p, VirtioNetHeader.Size); // header and frame in separate buffers, as Linux does
        var q = Packet(1514, 0x20);
        PostTransmit(Data + 0x1000, q, 5, 20); // framing that splits the header: the device assumes none (§2.6.4)

        Transmit();

        Assert.Equal([p, q], _backend.Sent);
        Assert.Equal(2, _tx.UsedIdx);
        Assert.Equal([(0u, 0u), (2u, 0u)], [_tx.UsedElem(0), _tx.UsedElem(1)]);
        Assert.Equal((2UL, 0UL), (_net.TxFrames, _net.TxDropped));
        Assert.Equal(2, _tx.AvailEvent); // §2.7.10: notify at the next chain
    }

    [Fact]
    public void The_transmit_header_passes_a_negotiated_checksum_and_tso_request_and_clears_unknown_flags_and_num_buffers()
    {
        _features = Basic | VirtioNetFeatures.Csum | VirtioNetFeatures.HostTso4;
        var p = Packet(1000, 0x30, flags: VirtioNetHeader.FlagNeedsCsum | 0b1000_0100, gso: VirtioNetHeader.GsoTcpV4,
            csumStart: 34, csumOffset: 16);
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(2), 54);   // hdr_len
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(4), 1448); // gso_size
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(10), 7);   // num_buffers: meaningless on transmit
        PostTransmit(Data, p, VirtioNetHeader.Size);

        Transmit();

        var sent = Assert.Single(_backend.Sent);
        Assert.Equal(VirtioNetHeader.FlagNeedsCsum, sent[0]);
        Assert.Equal(VirtioNetHeader.GsoTcpV4, sent[1]);
        Assert.Equal(p[2..10], sent[2..10]);
        Assert.Equal(0, BinaryPrimitives.ReadUInt16LittleEndian(sent.AsSpan(10)));
        Assert.Equal(Frame(p), sent[VirtioNetHeader.Size..]);
    }

    [Fact]
    public void Transmit_chains_with_bad_lengths_or_offloads_not_negotiated_are_dropped_counted_and_returned()
    {
        PostTransmit(Data, new byte[8]);                                                  // header shorter than 12
        PostTransmit(Data + 0x100, Packet(13, 1));                                        // frame shorter than an Ethernet header
        PostTransmit(Data + 0x200, Packet(60, 2, flags: VirtioNetHeader.FlagNeedsCsum));  // NEEDS_CSUM without CSUM
        PostTransmit(Data + 0x300, Packet(60, 3, gso: VirtioNetHeader.GsoTcpV4));         // TSO4 without HOST_TSO4
        PostTransmit(Data + 0x400, Packet(60, 4, gso: 0x80 | VirtioNetHeader.GsoTcpV4));  // ECN: not offered
        PostTransmit(Data + 0x1000, Packet(VirtioNetHeader.MaxFrame + 1, 5), 12, 0x8000);  // over 65550 bytes
        var good = Packet(VirtioNetHeader.MaxFrame, 6);
        PostTransmit(Data + 0x2_0000, good, 12, 0x8000);                                   // exactly 65550: sent

        Transmit();

        Assert.Equal([Frame(good)], _backend.Sent.Select(Frame));
        Assert.Equal(7, _tx.UsedIdx);
        Assert.All(Enumerable.Range(0, 7), i => Assert.Equal(0u, _tx.UsedElem(i).Len));
        Assert.Equal((1UL, 6UL), (_net.TxFrames, _net.TxDropped));
        Assert.Null(_txq.Error);
    }

    [Fact]
    public void A_frame_the_backend_refuses_is_counted_as_dropped_and_its_chain_returned()
    {
        _backend.Refuse = true;
        PostTransmit(Data, Packet(60, 1));

        Transmit();

        Assert.Equal((0UL, 1UL), (_net.TxFrames, _net.TxDropped));
        Assert.Equal((0u, 0u), _tx.UsedElem(0));
    }

    [Fact]
    public void A_transmit_buffer_outside_ram_breaks_the_queue_and_sends_nothing()
    {
        _tx.SetDesc(0, Data, VirtioNetHeader.Size, DescNext, 1);
        _tx.SetDesc(1, TestGuestMemory.RamSize + TestGuestMemory.RomSize - 8, 64);
        _tx.MakeAvailable(0);

        Transmit();

        Assert.Equal(VirtqueueError.BufferOutsideRam, _txq.Error);
        Assert.Empty(_backend.Sent);
        Assert.Equal(0, _tx.UsedIdx);
        Assert.Equal(0, _m.AccessesOutside);
    }

    // ---------------------------------------------------------------- receive

    [Fact]
    public void A_received_frame_fills_one_buffer_with_its_header_num_buffers_one_and_the_frame()
    {
        PostReceive(0, Data, 2048);
        var p = Packet(98, 0x40);
        _backend.Incoming.Enqueue(p);

        Receive();

        Assert.Equal(1, _rx.UsedIdx);
        Assert.Equal((0u, (uint)p.Length), _rx.UsedElem(0));
        Assert.Equal(1, NumBuffers(Data));
        Assert.Equal(p[..10], _m.Bytes(Data, 10));
        Assert.Equal(Frame(p), _m.Bytes(Data + VirtioNetHeader.Size, 98));
        Assert.Equal(0xEE, _m.Bytes(Data + (ulong)p.Length, 1)[0]);
        Assert.Equal((1UL, 0UL), (_net.RxFrames, _net.RxDropped));
    }

    [Fact]
    public void Without_merged_buffers_a_frame_too_big_for_its_chain_is_dropped_and_the_chain_returned_empty()
    {
        PostReceive(0, Data, 100);
        PostReceive(1, Data + 0x1000, 2048);
        _backend.Incoming.Enqueue(Packet(200, 1));
        var small = Packet(60, 2);
        _backend.Incoming.Enqueue(small);

        Receive();

        Assert.Equal([(0u, 0u), (1u, (uint)small.Length)], [_rx.UsedElem(0), _rx.UsedElem(1)]);
        Assert.Equal(Enumerable.Repeat((byte)0xEE, 100), _m.Bytes(Data, 100)); // nothing written into the short chain
        Assert.Equal(Frame(small), _m.Bytes(Data + 0x1000 + VirtioNetHeader.Size, 60));
        Assert.Equal((1UL, 1UL), (_net.RxFrames, _net.RxDropped));
    }

    [Fact]
    public void With_merged_buffers_a_frame_spans_chains_in_order_and_num_buffers_counts_them()
    {
        _features = Merged;
        PostReceive(0, Data, 64);
        PostReceive(1, Data + 0x100, 64);
        PostReceive(2, Data + 0x200, 64);
        PostReceive(3, Data + 0x300, 64);
        var p = Packet(150, 0x50); // 162 bytes: 64 + 64 + 34
        var q = Packet(40, 0x90);  // 52 bytes: the fourth chain
        _backend.Incoming.Enqueue(p);
        _backend.Incoming.Enqueue(q);

        Receive();

        Assert.Equal(4, _rx.UsedIdx);
        Assert.Equal([(0u, 64u), (1u, 64u), (2u, 34u), (3u, 52u)], Enumerable.Range(0, 4).Select(_rx.UsedElem));
        Assert.Equal(3, NumBuffers(Data));
        Assert.Equal(1, NumBuffers(Data + 0x300));
        byte[] got = [.. _m.Bytes(Data, 64), .. _m.Bytes(Data + 0x100, 64), .. _m.Bytes(Data + 0x200, 34)];
        Assert.Equal(Frame(p), got[VirtioNetHeader.Size..]);
        Assert.Equal(0xEE, _m.Bytes(Data + 0x200 + 34, 1)[0]);
        Assert.Equal(Frame(q), _m.Bytes(Data + 0x300 + VirtioNetHeader.Size, 40));
        Assert.Equal((2UL, 0UL), (_net.RxFrames, _net.RxDropped));
    }

    [Fact]
    public void With_merged_buffers_a_frame_waits_for_enough_chains_and_none_is_used_before_all_are_there()
    {
        _features = Merged;
        PostReceive(0, Data, 64);
        var p = Packet(100, 0x60); // 112 bytes: two chains
        _backend.Incoming.Enqueue(p);

        Receive();
        Assert.Equal(0, _rx.UsedIdx); // one chain taken and kept; nothing published
        Assert.Equal(1, _net.HeldFrames);
        Assert.Equal(1, _rx.AvailEvent); // asks for the driver's next buffer (§2.7.10)

        PostReceive(1, Data + 0x100, 64);
        Receive();

        Assert.Equal(2, _rx.UsedIdx);
        Assert.Equal([(0u, 64u), (1u, 48u)], [_rx.UsedElem(0), _rx.UsedElem(1)]);
        Assert.Equal(2, NumBuffers(Data));
        Assert.Equal(0, _net.HeldFrames);
    }

    [Fact]
    public void With_merged_buffers_a_chain_too_small_for_the_header_is_returned_empty_and_skipped()
    {
        _features = Merged;
        PostReceive(0, Data, 8);
        PostReceive(1, Data + 0x100, 256);
        var p = Packet(60, 1);
        _backend.Incoming.Enqueue(p);

        Receive();

        Assert.Equal([(0u, 0u), (1u, (uint)p.Length)], [_rx.UsedElem(0), _rx.UsedElem(1)]);
        Assert.Equal(1, NumBuffers(Data + 0x100));
    }

    [Fact]
    public void Frames_without_buffers_are_held_in_order_and_delivered_before_newer_ones_once_the_driver_posts()
    {
        var a = Packet(60, 1);
        var b = Packet(61, 2);
        _backend.Incoming.Enqueue(a);
        _backend.Incoming.Enqueue(b);
        Receive(); // the backend became readable: no buffer yet

        Assert.Equal(2, _net.HeldFrames);
        Assert.Empty(_backend.Incoming);

        var c = Packet(62, 3);
        _backend.Incoming.Enqueue(c);
        PostReceive(0, Data, 256);
        PostReceive(1, Data + 0x100, 256);
        Receive(); // the driver's notification

        Assert.Equal([(0u, (uint)a.Length), (1u, (uint)b.Length)], [_rx.UsedElem(0), _rx.UsedElem(1)]);
        Assert.Equal(Frame(a), _m.Bytes(Data + VirtioNetHeader.Size, 60));
        Assert.Equal(Frame(b), _m.Bytes(Data + 0x100 + VirtioNetHeader.Size, 61));
        Assert.Equal(1, _net.HeldFrames); // c came after them and waits for the next buffer

        PostReceive(2, Data + 0x200, 256);
        Receive();
        Assert.Equal(Frame(c), _m.Bytes(Data + 0x200 + VirtioNetHeader.Size, 62));
        Assert.Equal((3UL, 0UL), (_net.RxFrames, _net.RxDropped));
    }

    [Fact]
    public void Frames_beyond_the_held_bound_are_dropped_and_counted()
    {
        const int frame = 65000;
        var fit = VirtioNet.MaxHeldBytes / (VirtioNetHeader.Size + frame); // 16
        for (var i = 0; i < fit + 4; i++) _backend.Incoming.Enqueue(Packet(frame, (byte)i));

        Receive();

        Assert.Equal(fit, _net.HeldFrames);
        Assert.Equal(fit * (VirtioNetHeader.Size + frame), _net.HeldBytes);
        Assert.Equal(4UL, _net.RxDropped);
        Assert.Empty(_backend.Incoming);

        PostReceive(0, Data, VirtioNetHeader.Size + frame);
        Receive();
        Assert.Equal(Frame(Packet(frame, 0)), _m.Bytes(Data + VirtioNetHeader.Size, frame)); // the oldest first
        Assert.Equal(fit - 1, _net.HeldFrames);
    }

    [Fact]
    public void The_backend_is_read_at_most_a_bounded_number_of_frames_per_call()
    {
        for (var i = 0; i < VirtioNet.MaxReadsPerCall + 10; i++) _backend.Incoming.Enqueue(Packet(60, (byte)i));

        Receive();

        Assert.Equal(10, _backend.Incoming.Count);
        Assert.Equal(VirtioNet.MaxReadsPerCall, _net.HeldFrames);
    }

    [Fact]
    public void Runts_and_frames_longer_than_65550_bytes_from_the_backend_are_dropped()
    {
        PostReceive(0, Data, 2048);
        _backend.Incoming.Enqueue(new byte[VirtioNetHeader.Size + 10]);
        _backend.Incoming.Enqueue(Packet(VirtioNetHeader.MaxFrame + 1, 1));
        var ok = Packet(60, 2);
        _backend.Incoming.Enqueue(ok);

        Receive();

        Assert.Equal((0u, (uint)ok.Length), _rx.UsedElem(0));
        Assert.Equal((1UL, 2UL), (_net.RxFrames, _net.RxDropped));
    }

    [Fact]
    public void The_receive_header_carries_only_the_offloads_the_driver_negotiated()
    {
        for (ushort i = 0; i < 4; i++) PostReceive(i, Data + 0x1000UL * i, 2048);
        _backend.Incoming.Enqueue(Packet(60, 1, flags: VirtioNetHeader.FlagNeedsCsum, csumStart: 34, csumOffset: 6)); // no GUEST_CSUM: dropped
        _backend.Incoming.Enqueue(Packet(60, 2, flags: VirtioNetHeader.FlagDataValid | 0b100));                     // flags cleared
        _backend.Incoming.Enqueue(Packet(60, 3, gso: VirtioNetHeader.GsoTcpV4));                                    // no GUEST_TSO4: dropped

        Receive();

        Assert.Equal(1, _rx.UsedIdx);
        Assert.Equal(0, _m.Bytes(Data, 1)[0]);
        Assert.Equal(Frame(Packet(60, 2)), _m.Bytes(Data + VirtioNetHeader.Size, 60));
        Assert.Equal((1UL, 2UL), (_net.RxFrames, _net.RxDropped));
        Assert.Equal([NetOffloads.None], _backend.OffloadCalls);

        // A driver that negotiated GUEST_CSUM and GUEST_TSO4 gets both, as the backend was told.
        _features = Basic | VirtioNetFeatures.GuestCsum | VirtioNetFeatures.GuestTso4;
        var tso = Packet(1500, 4, flags: VirtioNetHeader.FlagNeedsCsum, gso: VirtioNetHeader.GsoTcpV4, csumStart: 34, csumOffset: 16);
        BinaryPrimitives.WriteUInt16LittleEndian(tso.AsSpan(4), 700); // gso_size
        _backend.Incoming.Enqueue(tso);

        Receive();

        Assert.Equal([NetOffloads.None, NetOffloads.Checksum | NetOffloads.Tso4], _backend.OffloadCalls);
        Assert.Equal(2, _rx.UsedIdx);
        var at = Data + 0x1000;
        Assert.Equal(tso[..10], _m.Bytes(at, 10));
        Assert.Equal(Frame(tso), _m.Bytes(at + VirtioNetHeader.Size, 1500));
    }

    [Fact]
    public void A_receive_buffer_outside_ram_breaks_the_queue_and_nothing_is_written_outside()
    {
        _rx.SetDesc(0, TestGuestMemory.RamSize - 16, 64, DescWrite);
        _rx.MakeAvailable(0);
        _backend.Incoming.Enqueue(Packet(60, 1));

        Receive();

        Assert.Equal(VirtqueueError.BufferOutsideRam, _rxq.Error);
        Assert.Equal(0, _rx.UsedIdx);
        Assert.Equal(0, _m.AccessesOutside);
        Assert.Equal(0, _m.RomWrites);
    }

    [Fact]
    public void Reset_drops_held_frames_and_the_backend_offloads()
    {
        _features = Basic | VirtioNetFeatures.GuestCsum;
        _backend.Incoming.Enqueue(Packet(60, 1));
        Receive();
        Assert.Equal(1, _net.HeldFrames);

        _net.Reset();

        Assert.Equal((0, 0), (_net.HeldFrames, _net.HeldBytes));
        Assert.Equal([NetOffloads.Checksum, NetOffloads.None], _backend.OffloadCalls);
    }

    // ---------------------------------------------------------------- restarts

    [Fact]
    public void A_model_rebuilt_from_its_state_keeps_its_mac_and_counters_retakes_reserved_chains_and_sends_no_frame_twice()
    {
        _features = Merged;
        var sent = Packet(60, 0x11);
        PostTransmit(Data + 0x8000, sent);
        Transmit();
        PostReceive(0, Data, 64);
        _backend.Incoming.Enqueue(Packet(100, 0x22)); // needs two chains: chain 0 is taken and kept
        Receive();
        Assert.Equal(0, _rx.UsedIdx);

        var state = Assert.IsType<VirtioNetState>(DeviceStateCodec.Decode(DeviceStateCodec.Encode(_net.State())));
        Assert.Equal(new VirtioNetState("52:54:00:12:34:56", 1, 0, 0, 0), state);
        _net = VirtioNet.FromState(state, _m, _backend, () => _features);
        _rxq = SplitVirtqueue.FromState(new GuestRam(_m), _rxq.State(), _features);
        _txq = SplitVirtqueue.FromState(new GuestRam(_m), _txq.State(), _features);

        Transmit();
        Assert.Equal([sent], _backend.Sent); // on the used ring before: not sent again

        PostReceive(1, Data + 0x100, 64);
        var after = Packet(100, 0x33); // the held frame was lost with the model; a new one arrives
        _backend.Incoming.Enqueue(after);
        Receive();

        Assert.Equal(2, _rx.UsedIdx);
        Assert.Equal([(0u, 64u), (1u, 48u)], [_rx.UsedElem(0), _rx.UsedElem(1)]); // chain 0 taken again, in order
        byte[] got = [.. _m.Bytes(Data, 64), .. _m.Bytes(Data + 0x100, 48)];
        Assert.Equal(Frame(after), got[VirtioNetHeader.Size..]);
        Assert.Equal(Mac, _net.Mac);
        Assert.Equal((1UL, 1UL), (_net.TxFrames, _net.RxFrames));
        Assert.Equal(NetOffloads.None, _backend.OffloadCalls[^1]); // set again after the restart
        Assert.Equal(2, _backend.OffloadCalls.Count);
    }

    [Theory]
    [InlineData("52:54:00:12:34")]
    [InlineData("52:54:00:12:34:5g")]
    [InlineData("01:00:5e:00:00:01")]
    public void A_state_with_a_bad_or_multicast_mac_is_refused(string mac)
    {
        var state = new VirtioNetState(mac, 0, 0, 0, 0);

        Assert.NotNull(VirtioNet.StateProblem(state));
        Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Encode(state));
        Assert.Throws<ArgumentException>(() => VirtioNet.FromState(state, _m, _backend, () => 0));
    }
}
