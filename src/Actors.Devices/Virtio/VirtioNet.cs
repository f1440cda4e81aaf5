using System.Buffers.Binary;
using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Virtio;

/// <summary>virtio-net feature bits (virtio 1.2 §5.1.3), as masks of the 64-bit feature word.</summary>
public static class VirtioNetFeatures
{
    /// <summary>VIRTIO_NET_F_CSUM (0): the device takes frames with a partial checksum from the driver.</summary>
    public const ulong Csum = 1UL << 0;
    /// <summary>VIRTIO_NET_F_GUEST_CSUM (1): the driver takes frames with a partial checksum.</summary>
    public const ulong GuestCsum = 1UL << 1;
    /// <summary>VIRTIO_NET_F_MAC (5): <c>mac</c> in the configuration is the card's address.</summary>
    public const ulong Mac = 1UL << 5;
    /// <summary>VIRTIO_NET_F_GUEST_TSO4 (7): the driver takes TCPv4 segmentation-offload frames.</summary>
    public const ulong GuestTso4 = 1UL << 7;
    /// <summary>VIRTIO_NET_F_GUEST_TSO6 (8): the driver takes TCPv6 segmentation-offload frames.</summary>
    public const ulong GuestTso6 = 1UL << 8;
    /// <summary>VIRTIO_NET_F_HOST_TSO4 (11): the device takes TCPv4 segmentation-offload frames.</summary>
    public const ulong HostTso4 = 1UL << 11;
    /// <summary>VIRTIO_NET_F_HOST_TSO6 (12): the device takes TCPv6 segmentation-offload frames.</summary>
    public const ulong HostTso6 = 1UL << 12;
    /// <summary>VIRTIO_NET_F_MRG_RXBUF (15): a received frame may span several receive chains
    /// (num_buffers says how many).</summary>
    public const ulong MrgRxbuf = 1UL << 15;
    /// <summary>VIRTIO_NET_F_STATUS (16): <c>status</c> in the configuration is valid.</summary>
    public const ulong Status = 1UL << 16;
}

/// <summary><c>struct virtio_net_hdr</c> of virtio 1.x (virtio 1.2 §5.1.6): 12 bytes, little-endian.</summary>
public static class VirtioNetHeader
{
    /// <summary>flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.</summary>
    public const int Size = 12;
    public const int FlagsOffset = 0;
    public const int GsoTypeOffset = 1;
    public const int NumBuffersOffset = 10;

    /// <summary>VIRTIO_NET_HDR_F_NEEDS_CSUM: the checksum at csum_start + csum_offset is partial.</summary>
    public const byte FlagNeedsCsum = 0b001;
    /// <summary>VIRTIO_NET_HDR_F_DATA_VALID (receive only): the checksums were checked.</summary>
    public const byte FlagDataValid = 0b010;

    public const byte GsoNone = 0;
    public const byte GsoTcpV4 = 1;
    public const byte GsoTcpV6 = 4;

    /// <summary>Largest Ethernet frame (without the header) either way: 65550 bytes (§5.1.6.3: receive
    /// buffers of 65562 bytes hold the header and any frame).</summary>
    public const int MaxFrame = 65550;
    /// <summary>Destination, source, EtherType.</summary>
    public const int MinFrame = 14;
}

/// <summary>
/// What a virtio-net model needs to continue after a restart: the card's MAC address (so that the guest
/// keeps its address) and the frame counters. Frames held for the guest are not kept: a restart loses
/// them, as a wire would (see <see cref="VirtioNet"/>).
/// </summary>
public sealed record VirtioNetState(string Mac, ulong TxFrames, ulong TxDropped, ulong RxFrames, ulong RxDropped);

/// <summary>
/// virtio network device (virtio 1.2 §5.1): device ID 1, queue 0 receiveq1, queue 1 transmitq1, no
/// control queue (no VIRTIO_NET_F_CTRL_VQ: the guest cannot change the MAC, filters or offloads at run
/// time, and every frame the backend gives is delivered), no multiqueue. Backed by an
/// <see cref="INetBackend"/> (a TAP interface: <see cref="TapNetBackend"/>).
///
/// Features offered: MAC (the given address), STATUS (link always up), MRG_RXBUF, CSUM and HOST_TSO4/6
/// (the driver's header goes to the backend as the TAP's vnet header, which applies it), GUEST_CSUM and
/// GUEST_TSO4/6 (what the driver negotiated is what the backend may use in frames for it: TUNSETOFFLOAD).
/// VERSION_1 comes from the transport, so the header is always the 12-byte one with num_buffers (§5.1.6.1).
///
/// <list type="bullet">
/// <item>transmitq (§5.1.6.2): the device-readable bytes of each chain are the header then the frame;
/// a chain whose header is shorter than 12 bytes, whose frame is shorter than an Ethernet header (14)
/// or longer than 65550 bytes, or whose header asks for an offload that was not negotiated
/// (NEEDS_CSUM without CSUM, a GSO type without its HOST_TSO feature, ECN or UDP segmentation) is
/// dropped; so is a frame the backend refuses. Flag bits other than NEEDS_CSUM are cleared
/// (§5.1.6.2.2: ignored) and num_buffers is zeroed. Every chain is returned with length 0 (the device
/// wrote nothing), dropped or not. Counted in TxFrames / TxDropped.</item>
/// <item>receiveq (§5.1.6.3, §5.1.6.4): frames from the backend are written, header first, into the
/// device-writable buffers of the receive chains. With MRG_RXBUF a frame fills as many chains as it
/// needs, in order, and the first one's num_buffers says how many; they go on the used ring together.
/// Without it a frame takes one chain (num_buffers 1) and one that does not fit is dropped, its chain
/// returned with length 0 (Linux counts a length error and reposts it). The header is checked against
/// what the driver negotiated (§5.1.6.4.1): without GUEST_CSUM flags are 0 (a frame needing a checksum
/// is dropped); a GSO type without its GUEST_TSO feature is dropped. Under MRG_RXBUF a chain with fewer
/// than 12 writable bytes at the start of a frame (§5.1.6.3.1: each buffer MUST hold a header) is returned
/// with length 0.</item>
/// <item>Holding: frames the backend has while the driver has posted no (or not enough) buffers are
/// read and held, oldest first, up to <see cref="MaxHeldBytes"/> (1 MiB of header + frame bytes); beyond
/// that they are dropped and counted in RxDropped (as a NIC drops when its ring is full). At most
/// <see cref="MaxReadsPerCall"/> frames are read from the backend per call, so a flood cannot keep the
/// model busy; the owner calls again while the backend is readable.</item>
/// </list>
/// <see cref="Process"/> for <see cref="ReceiveQueue"/> both takes the driver's new buffers and reads the
/// backend: its owner calls the transport's NotifyQueue(<see cref="ReceiveQueue"/>) when the backend has
/// frames (the TAP's fd is readable), which runs it and sends the used-buffer notification.
///
/// Every buffer was checked by <see cref="SplitVirtqueue"/> (a chain outside RAM breaks the queue:
/// DEVICE_NEEDS_RESET), so nothing here touches memory outside the guest or throws for guest input.
///
/// Restarts: the used ring is the truth (<see cref="SplitVirtqueue.FromState"/>). Chains are put on the
/// used ring in the order they were taken, so a receive chain taken but not yet used (held for a frame
/// still being merged) is taken again after a restart. Held frames are lost with the model (at most
/// 1 MiB of frames, which the guest's protocols retransmit, as after a drop on a wire). A transmit chain
/// is put on the used ring right after its frame went to the backend; only an exception from the
/// backend between the two (the model throws none) would send that frame again after the restart.
/// </summary>
public sealed class VirtioNet : IVirtioDevice, IVirtioBackendInput
{
    public const ushort VirtioDeviceId = 1;
    public const ushort QueueSize = 256;
    public const int ReceiveQueue = 0;
    public const int TransmitQueue = 1;
    /// <summary>Header + frame bytes held while the driver has posted no buffer for them.</summary>
    public const int MaxHeldBytes = 1 << 20;
    /// <summary>Frames read from the backend in one <see cref="Process"/> call.</summary>
    public const int MaxReadsPerCall = 256;
    /// <summary><c>struct virtio_net_config</c> (§5.1.4) up to supported_hash_types: mac[6], status,
    /// max_virtqueue_pairs, mtu, speed, duplex, rss_max_key_size, rss_max_indirection_table_length,
    /// supported_hash_types. Fields of features not offered read 0.</summary>
    public const int ConfigSize = 24;
    /// <summary>VIRTIO_NET_S_LINK_UP in <c>status</c>.</summary>
    public const ushort StatusLinkUp = 1;

    private const int CfgStatus = 6;
    private const int CfgMaxVirtqueuePairs = 8;
    private const int MaxPacket = VirtioNetHeader.Size + VirtioNetHeader.MaxFrame;

    private readonly IGuestMemory _memory;
    private readonly INetBackend _backend;
    private readonly Func<ulong> _driverFeatures;
    private readonly byte[] _config = new byte[ConfigSize];
    private readonly byte[] _tx = new byte[MaxPacket];
    // One byte more than the largest packet: a longer frame reads as too long whether the backend reports
    // its full length or only what fit.
    private readonly byte[] _rx = new byte[MaxPacket + 1];
    private readonly Queue<byte[]> _held = new();
    private readonly List<DescriptorChain> _reserved = [];
    private SplitVirtqueue? _reservedRing;
    private int _heldBytes;
    private NetOffloads? _offloads;

    public MacAddress Mac { get; }
    public ulong TxFrames { get; private set; }
    public ulong TxDropped { get; private set; }
    public ulong RxFrames { get; private set; }
    public ulong RxDropped { get; private set; }
    public int HeldFrames => _held.Count;
    public int HeldBytes => _heldBytes;

    public ushort DeviceId => VirtioDeviceId;

    public ulong Features =>
        VirtioNetFeatures.Csum | VirtioNetFeatures.GuestCsum | VirtioNetFeatures.Mac | VirtioNetFeatures.GuestTso4
        | VirtioNetFeatures.GuestTso6 | VirtioNetFeatures.HostTso4 | VirtioNetFeatures.HostTso6
        | VirtioNetFeatures.MrgRxbuf | VirtioNetFeatures.Status;

    public IReadOnlyList<ushort> QueueMaxSizes { get; } = [QueueSize, QueueSize];
    public int ConfigLength => ConfigSize;

    /// <summary>A card with address <paramref name="mac"/> (unicast) over <paramref name="backend"/>, which
    /// the model does not own (its owner disposes it; a restarted model gets the same one).</summary>
    /// <param name="memory">Guest memory of the buffers (the queue has checked they are RAM).</param>
    /// <param name="driverFeatures">The features the driver negotiated, read per call (so it follows
    /// resets).</param>
    public VirtioNet(IGuestMemory memory, INetBackend backend, MacAddress mac, Func<ulong> driverFeatures)
    {
        if (mac.IsMulticast) throw new ArgumentException($"{mac} is a multicast address, not a card's", nameof(mac));
        _memory = memory;
        _backend = backend;
        _driverFeatures = driverFeatures;
        Mac = mac;
        mac.CopyTo(_config);
        BinaryPrimitives.WriteUInt16LittleEndian(_config.AsSpan(CfgStatus), StatusLinkUp);
        BinaryPrimitives.WriteUInt16LittleEndian(_config.AsSpan(CfgMaxVirtqueuePairs), 1);
    }

    public VirtioNetState State() => new(Mac.ToString(), TxFrames, TxDropped, RxFrames, RxDropped);

    /// <summary>Why <paramref name="state"/> cannot be restored (a MAC that is not a unicast
    /// "xx:xx:xx:xx:xx:xx"), or null.</summary>
    public static string? StateProblem(VirtioNetState state) =>
        !MacAddress.TryParse(state.Mac, out var mac) ? $"mac \"{state.Mac}\" is not a MAC address (xx:xx:xx:xx:xx:xx)"
        : mac.IsMulticast ? $"mac {mac} is a multicast address"
        : null;

    /// <summary>The model continuing from <paramref name="state"/>: same address and counters; the
    /// backend's offloads are set again at the next <see cref="Process"/>.</summary>
    public static VirtioNet FromState(VirtioNetState state, IGuestMemory memory, INetBackend backend, Func<ulong> driverFeatures)
    {
        if (StateProblem(state) is { } problem) throw new ArgumentException(problem, nameof(state));
        MacAddress.TryParse(state.Mac, out var mac);
        return new VirtioNet(memory, backend, mac, driverFeatures)
        {
            TxFrames = state.TxFrames,
            TxDropped = state.TxDropped,
            RxFrames = state.RxFrames,
            RxDropped = state.RxDropped,
        };
    }

    /// <summary>Reads <paramref name="size"/> bytes (little-endian) of the configuration at any offset;
    /// bytes past the layout read 0. Nothing in it changes while the device runs (the generation stays).</summary>
    public ulong ReadConfig(ulong offset, int size)
    {
        ulong value = 0;
        for (var i = 0; i < size && i < 8; i++)
        {
            var at = offset + (ulong)i;
            if (at < ConfigSize) value |= (ulong)_config[at] << (8 * i);
        }
        return value;
    }

    /// <summary>Every field is read-only for a virtio 1.x driver (§5.1.4.2; changing the MAC needs the
    /// control queue): writes are ignored.</summary>
    public void WriteConfig(ulong offset, int size, ulong value) { }

    /// <summary>The driver reset the device (§2.4): held frames and taken receive chains go with the
    /// queues, and the backend stops using offloads until the driver negotiates them again.</summary>
    public void Reset()
    {
        _held.Clear();
        _heldBytes = 0;
        _reserved.Clear();
        _reservedRing = null;
        _backend.SetReceiveOffloads(NetOffloads.None);
        _offloads = NetOffloads.None;
    }

    public int BackendQueue => ReceiveQueue;

    /// <summary>The driver cannot take frames (the device is not live, receiveq1 is not enabled, or the
    /// function may not access memory): up to <see cref="MaxReadsPerCall"/> frames the backend has are read
    /// and dropped, counted in RxDropped, as a NIC whose receiver is off drops what reaches it (frames
    /// held for the driver stay until a reset).</summary>
    public void DiscardBackendInput()
    {
        for (var reads = 0; reads < MaxReadsPerCall && _backend.TryReceive(_rx) > 0; reads++) RxDropped++;
    }

    public void Process(int queue, SplitVirtqueue ring)
    {
        var features = _driverFeatures();
        ApplyOffloads(features);
        if (queue == TransmitQueue) Transmit(ring, features);
        else if (queue == ReceiveQueue) Receive(ring, features);
    }

    /// <summary>The offloads the backend may use are exactly those the driver negotiated (GUEST_TSO
    /// needs GUEST_CSUM, §5.1.3.1).</summary>
    private void ApplyOffloads(ulong features)
    {
        var csum = (features & VirtioNetFeatures.GuestCsum) != 0;
        var want = (csum ? NetOffloads.Checksum : 0)
            | (csum && (features & VirtioNetFeatures.GuestTso4) != 0 ? NetOffloads.Tso4 : 0)
            | (csum && (features & VirtioNetFeatures.GuestTso6) != 0 ? NetOffloads.Tso6 : 0);
        if (_offloads == want) return;
        _backend.SetReceiveOffloads(want);
        _offloads = want;
    }

    // ---------------------------------------------------------------- transmit (§5.1.6.2)

    private void Transmit(SplitVirtqueue ring, ulong features)
    {
        do
        {
            ring.DisableNotifications();
            while (ring.TryPop(out var chain))
            {
                if (Send(chain, features)) TxFrames++;
                else TxDropped++;
                if (!ring.Push(chain.Head, 0)) return;
            }
            if (ring.Error is not null) return;
        } while (ring.EnableNotifications());
    }

    private bool Send(DescriptorChain chain, ulong features)
    {
        var length = chain.ReadableLength;
        if (length < VirtioNetHeader.Size + VirtioNetHeader.MinFrame || length > MaxPacket) return false;
        var packet = _tx.AsSpan(0, (int)length);
        var at = 0;
        foreach (var b in chain.Readable)
        {
            if (!_memory.TryRead(b.Address, packet.Slice(at, (int)b.Length))) return false;
            at += (int)b.Length;
        }
        var flags = (byte)(packet[VirtioNetHeader.FlagsOffset] & VirtioNetHeader.FlagNeedsCsum);
        if (flags != 0 && (features & VirtioNetFeatures.Csum) == 0) return false;
        var gsoAllowed = packet[VirtioNetHeader.GsoTypeOffset] switch
        {
            VirtioNetHeader.GsoNone => true,
            VirtioNetHeader.GsoTcpV4 => (features & VirtioNetFeatures.HostTso4) != 0,
            VirtioNetHeader.GsoTcpV6 => (features & VirtioNetFeatures.HostTso6) != 0,
            _ => false, // UDP, UDP_L4, ECN: not offered
        };
        if (!gsoAllowed) return false;
        packet[VirtioNetHeader.FlagsOffset] = flags;
        BinaryPrimitives.WriteUInt16LittleEndian(packet[VirtioNetHeader.NumBuffersOffset..], 0);
        return _backend.Send(packet);
    }

    // ---------------------------------------------------------------- receive (§5.1.6.3, §5.1.6.4)

    private enum Delivery { Delivered, Dropped, NoBuffers, Broken }

    private void Receive(SplitVirtqueue ring, ulong features)
    {
        if (!ReferenceEquals(ring, _reservedRing))
        {
            _reserved.Clear(); // a new queue (after a restart) takes those chains again from its avail ring
            _reservedRing = ring;
        }
        var reads = 0;
        while (true)
        {
            ring.DisableNotifications();
            var blocked = false;
            while (!blocked)
            {
                byte[]? held = null;
                ReadOnlySpan<byte> packet;
                if (_held.Count > 0) packet = held = _held.Peek();
                else if (reads < MaxReadsPerCall && ReadBackend(ref reads) is { } n) packet = _rx.AsSpan(0, n);
                else break;
                if (packet.IsEmpty) continue; // a bad frame from the backend, dropped

                switch (Deliver(ring, packet, features))
                {
                    case Delivery.Delivered:
                        RxFrames++;
                        break;
                    case Delivery.Dropped:
                        RxDropped++;
                        break;
                    case Delivery.Broken: // DEVICE_NEEDS_RESET; a frame from the backend is lost with the queue
                        if (held is null) RxDropped++;
                        return;
                    case Delivery.NoBuffers:
                        if (held is null) Hold(packet);
                        blocked = true;
                        continue;
                }
                if (held is not null) Unhold();
            }
            if (ring.Error is not null || !blocked) return; // nothing waits for buffers: the backend drives
            // No room (§5.1.6.3): take what the backend has into the held frames (bounded), then ask for
            // the driver's next notification; if buffers came meanwhile, go on.
            while (reads < MaxReadsPerCall && ReadBackend(ref reads) is { } n)
                if (n > 0) Hold(_rx.AsSpan(0, n));
            if (!ring.EnableNotifications()) return;
        }
    }

    /// <summary>Reads one frame from the backend into <see cref="_rx"/>: its length, 0 for a frame that
    /// was dropped (too short, too long), null if the backend has none.</summary>
    private int? ReadBackend(ref int reads)
    {
        var n = _backend.TryReceive(_rx);
        if (n <= 0) return null;
        reads++;
        if (n < VirtioNetHeader.Size + VirtioNetHeader.MinFrame || n > MaxPacket)
        {
            RxDropped++;
            return 0;
        }
        return n;
    }

    private void Hold(ReadOnlySpan<byte> packet)
    {
        if (_heldBytes + packet.Length > MaxHeldBytes)
        {
            RxDropped++;
            return;
        }
        _held.Enqueue(packet.ToArray());
        _heldBytes += packet.Length;
    }

    private void Unhold() => _heldBytes -= _held.Dequeue().Length;

    /// <summary>Writes one frame (header + frame as the backend gave them) into receive chains.</summary>
    private Delivery Deliver(SplitVirtqueue ring, ReadOnlySpan<byte> packet, ulong features)
    {
        Span<byte> header = stackalloc byte[VirtioNetHeader.Size];
        packet[..VirtioNetHeader.Size].CopyTo(header);
        if (!ReceiveHeaderAllowed(header, features)) return Delivery.Dropped;
        var body = packet[VirtioNetHeader.Size..];
        var total = (ulong)packet.Length;

        if ((features & VirtioNetFeatures.MrgRxbuf) == 0)
        {
            if (!TakeChain(ring, out var chain)) return ring.Error is null ? Delivery.NoBuffers : Delivery.Broken;
            if (chain.WritableLength < total)
            {
                // §5.1.6.3.2: without MRG_RXBUF a frame uses one chain; this one is too small.
                return ring.Push(chain.Head, 0) ? Delivery.Dropped : Delivery.Broken;
            }
            BinaryPrimitives.WriteUInt16LittleEndian(header[VirtioNetHeader.NumBuffersOffset..], 1);
            var ok = WriteRange(chain.Writable, header, body, 0, total);
            if (!ring.Push(chain.Head, ok ? (uint)total : 0)) return Delivery.Broken;
            return ok ? Delivery.Delivered : Delivery.Dropped;
        }

        // §5.1.6.4: as many chains as the frame needs; the first must hold the header.
        ulong room = 0;
        var count = 0;
        while (room < total)
        {
            if (count == _reserved.Count)
            {
                // Every chain the ring can hold is taken and the frame still does not fit: no buffer the
                // driver can post would help, so the frame is dropped (the chains wait for the next one).
                if (count >= ring.Size) return Delivery.Dropped;
                if (!ring.TryPop(out var next)) return ring.Error is null ? Delivery.NoBuffers : Delivery.Broken;
                _reserved.Add(next);
            }
            if (count == 0 && _reserved[0].WritableLength < VirtioNetHeader.Size)
            {
                var small = _reserved[0];
                _reserved.RemoveAt(0);
                if (!ring.Push(small.Head, 0)) return Delivery.Broken;
                continue;
            }
            room += _reserved[count].WritableLength;
            count++;
        }

        BinaryPrimitives.WriteUInt16LittleEndian(header[VirtioNetHeader.NumBuffersOffset..], (ushort)count);
        var used = new (ushort Head, uint WrittenLength)[count];
        var left = total;
        var written = true;
        var offset = 0UL;
        for (var i = 0; i < count; i++)
        {
            var c = _reserved[i];
            var n = Math.Min(c.WritableLength, left);
            used[i] = (c.Head, (uint)n);
            written &= WriteRange(c.Writable, header, body, offset, n);
            offset += n;
            left -= n;
        }
        _reserved.RemoveRange(0, count);
        if (!written)
            for (var i = 0; i < count; i++) used[i].WrittenLength = 0;
        if (!ring.Push(used)) return Delivery.Broken;
        return written ? Delivery.Delivered : Delivery.Dropped;
    }

    /// <summary>The next receive chain: one taken earlier (under MRG_RXBUF, before a reset cleared the
    /// list) or a new one.</summary>
    private bool TakeChain(SplitVirtqueue ring, out DescriptorChain chain)
    {
        if (_reserved.Count > 0)
        {
            chain = _reserved[0];
            _reserved.RemoveAt(0);
            return true;
        }
        return ring.TryPop(out chain!);
    }

    /// <summary>§5.1.6.4.1: the header may use only the offloads the driver negotiated; flag bits other
    /// than NEEDS_CSUM and DATA_VALID are cleared, and without GUEST_CSUM flags are 0.</summary>
    private static bool ReceiveHeaderAllowed(Span<byte> header, ulong features)
    {
        var flags = (byte)(header[VirtioNetHeader.FlagsOffset] & (VirtioNetHeader.FlagNeedsCsum | VirtioNetHeader.FlagDataValid));
        if ((features & VirtioNetFeatures.GuestCsum) == 0)
        {
            if ((flags & VirtioNetHeader.FlagNeedsCsum) != 0) return false;
            flags = 0;
        }
        header[VirtioNetHeader.FlagsOffset] = flags;
        return header[VirtioNetHeader.GsoTypeOffset] switch
        {
            VirtioNetHeader.GsoNone => true,
            VirtioNetHeader.GsoTcpV4 => (features & VirtioNetFeatures.GuestTso4) != 0,
            VirtioNetHeader.GsoTcpV6 => (features & VirtioNetFeatures.GuestTso6) != 0,
            _ => false,
        };
    }

    /// <summary>Writes bytes [<paramref name="from"/>, +<paramref name="length"/>) of header + body into
    /// the start of <paramref name="buffers"/>, in order.</summary>
    private bool WriteRange(IReadOnlyList<GuestBuffer> buffers, ReadOnlySpan<byte> header, ReadOnlySpan<byte> body, ulong from, ulong length)
    {
        var source = (int)from;
        var end = (int)(from + length);
        foreach (var b in buffers)
        {
            var to = b.Address;
            var space = (int)b.Length;
            while (space > 0 && source < end)
            {
                // One piece from the header or from the body, whichever the position is in.
                ReadOnlySpan<byte> piece = source < header.Length
                    ? header[source..Math.Min(header.Length, end)]
                    : body[(source - header.Length)..(end - header.Length)];
                if (piece.Length > space) piece = piece[..space];
                if (!_memory.TryWrite(to, piece)) return false;
                to += (ulong)piece.Length;
                space -= piece.Length;
                source += piece.Length;
            }
            if (source >= end) break;
        }
        return true;
    }
}
