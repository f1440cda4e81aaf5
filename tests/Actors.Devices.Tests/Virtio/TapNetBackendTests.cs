using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.InteropServices;
using ActorVmm.Devices.Virtio;
using ActorVmm.LibVmm;
using ActorVmm.Testing;
using static ActorVmm.Devices.Virtio.VirtqFlags;

namespace ActorVmm.Devices.Tests.Virtio;

/// <summary>
/// A fact that needs to create TAP interfaces and network namespaces: root (CAP_NET_ADMIN),
/// /dev/net/tun and iproute2's <c>ip</c>. Skipped with the missing piece named otherwise; CI runs as root.
/// </summary>
public sealed class TapFactAttribute : FactAttribute
{
    public TapFactAttribute()
    {
        if (IpTool.Unavailability() is { } reason) Skip = reason;
    }
}

/// <summary>A network namespace made for one test (<c>ip netns add</c>), deleted on dispose.</summary>
internal sealed class NetNamespace : IDisposable
{
    public string Name { get; }

    private NetNamespace(string name) => Name = name;

    public static NetNamespace Create()
    {
        var ns = new NetNamespace($"avm-vnet-{Environment.ProcessId}-{Random.Shared.Next():x}");
        IpTool.Run("netns", "add", ns.Name);
        return ns;
    }

    /// <summary>Moves interface <paramref name="name"/> into the namespace, gives it
    /// <paramref name="cidr"/> and brings it up.</summary>
    public void Adopt(string name, string cidr)
    {
        IpTool.Run("link", "set", name, "netns", Name);
        IpTool.Run("-n", Name, "addr", "add", cidr, "dev", name);
        IpTool.Run("-n", Name, "link", "set", name, "up");
    }

    public void Dispose() => IpTool.Run("netns", "del", Name);
}

/// <summary>
/// The TAP backend against the real Linux network stack (Documentation/networking/tuntap.rst): each test
/// makes a network namespace, moves a fresh TAP into it with an address, and exchanges real frames
/// with the namespace's kernel: an ARP request answered by an ARP reply, an ICMP echo request answered
/// by an echo reply. Frames are parsed 12 bytes in, so a wrong vnet header size shifts every field and
/// fails the test.
/// </summary>
public sealed class TapNetBackendTests
{
    private static readonly byte[] HostIp = [10, 211, 0, 1];
    private static readonly byte[] GuestIp = [10, 211, 0, 2];
    private static readonly MacAddress GuestMac = new(0x0200_0000_0002);
    private const ushort EtherArp = 0x0806;
    private const ushort EtherIpv4 = 0x0800;

    private static string TapName() => $"avm{Random.Shared.Next(0x100_0000):x6}";

    // ---------------------------------------------------------------- frames

    private static byte[] Ethernet(MacAddress dst, MacAddress src, ushort type, ReadOnlySpan<byte> payload)
    {
        var f = new byte[14 + payload.Length];
        dst.CopyTo(f);
        src.CopyTo(f.AsSpan(6));
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(12), type);
        payload.CopyTo(f.AsSpan(14));
        return f;
    }

    /// <summary>An ARP packet for IPv4 over Ethernet (RFC 826).</summary>
    private static byte[] Arp(ushort op, MacAddress sha, byte[] spa, MacAddress tha, byte[] tpa)
    {
        var a = new byte[28];
        BinaryPrimitives.WriteUInt16BigEndian(a, 1);              // htype Ethernet
        BinaryPrimitives.WriteUInt16BigEndian(a.AsSpan(2), EtherIpv4);
        a[4] = 6;
        a[5] = 4;
        BinaryPrimitives.WriteUInt16BigEndian(a.AsSpan(6), op);
        sha.CopyTo(a.AsSpan(8));
        spa.CopyTo(a, 14);
        tha.CopyTo(a.AsSpan(18));
        tpa.CopyTo(a, 24);
        return a;
    }

    private static ushort InternetChecksum(ReadOnlySpan<byte> data)
    {
        uint sum = 0;
        for (var i = 0; i + 1 < data.Length; i += 2) sum += BinaryPrimitives.ReadUInt16BigEndian(data[i..]);
        if (data.Length % 2 == 1) sum += (uint)data[^1] << 8;
        while (sum >> 16 != 0) sum = (sum & 0xFFFF) + (sum >> 16);
        return (ushort)~sum;
    }

    /// <summary>An IPv4 packet carrying an ICMP echo request (RFC 792) with <paramref name="data"/>.</summary>
    private static byte[] EchoRequest(ushort id, ushort seq, ReadOnlySpan<byte> data)
    {
        var icmp = new byte[8 + data.Length];
        icmp[0] = 8;
        BinaryPrimitives.WriteUInt16BigEndian(icmp.AsSpan(4), id);
        BinaryPrimitives.WriteUInt16BigEndian(icmp.AsSpan(6), seq);
        data.CopyTo(icmp.AsSpan(8));
        BinaryPrimitives.WriteUInt16BigEndian(icmp.AsSpan(2), InternetChecksum(icmp));
        var ip = new byte[20 + icmp.Length];
        ip[0] = 0x45;
        BinaryPrimitives.WriteUInt16BigEndian(ip.AsSpan(2), (ushort)ip.Length);
        ip[8] = 64; // TTL
        ip[9] = 1;  // ICMP
        GuestIp.CopyTo(ip, 12);
        HostIp.CopyTo(ip, 16);
        BinaryPrimitives.WriteUInt16BigEndian(ip.AsSpan(10), InternetChecksum(ip.AsSpan(0, 20)));
        icmp.CopyTo(ip, 20);
        return ip;
    }

    private static byte[] WithHeader(byte[] frame) => [.. new byte[VirtioNetHeader.Size], .. frame];

    private static ushort EtherType(ReadOnlySpan<byte> frame) => BinaryPrimitives.ReadUInt16BigEndian(frame[12..]);

    private static bool IsArpReplyToGuest(ReadOnlySpan<byte> f) =>
        f.Length >= 42 && EtherType(f) == EtherArp && BinaryPrimitives.ReadUInt16BigEndian(f[20..]) == 2
        && f[28..32].SequenceEqual(HostIp) && f[38..42].SequenceEqual(GuestIp) && MacAddress.FromBytes(f[..6]) == GuestMac;

    private static bool IsArpRequestForGuest(ReadOnlySpan<byte> f) =>
        f.Length >= 42 && EtherType(f) == EtherArp && BinaryPrimitives.ReadUInt16BigEndian(f[20..]) == 1 && f[38..42].SequenceEqual(GuestIp);

    private static bool IsEchoReply(ReadOnlySpan<byte> f, ushort id, ushort seq) =>
        f.Length >= 42 && EtherType(f) == EtherIpv4 && f[23] == 1 && f[26..30].SequenceEqual(HostIp) && f[30..34].SequenceEqual(GuestIp)
        && f[34] == 0 && BinaryPrimitives.ReadUInt16BigEndian(f[38..]) == id && BinaryPrimitives.ReadUInt16BigEndian(f[40..]) == seq;

    /// <summary>Reads frames from the TAP until one satisfies <paramref name="wanted"/> (answering the
    /// kernel's ARP requests for the guest's address meanwhile), for up to 10 s; returns it with its vnet
    /// header.</summary>
    private static byte[] Await(TapNetBackend backend, Func<byte[], bool> wanted, MacAddress hostMac = default)
    {
        var buffer = new byte[VirtioNetHeader.Size + VirtioNetHeader.MaxFrame];
        var seen = new List<string>();
        var deadline = Stopwatch.StartNew();
        while (deadline.Elapsed < TimeSpan.FromSeconds(10))
        {
            if (!backend.Tap.WaitReadable(100)) continue;
            var n = backend.TryReceive(buffer);
            if (n == 0) continue;
            Assert.InRange(n, VirtioNetHeader.Size + 14, buffer.Length);
            var packet = buffer[..n];
            var frame = packet[VirtioNetHeader.Size..];
            if (wanted(frame)) return packet;
            seen.Add($"{EtherType(frame):x4}/{n}");
            if (IsArpRequestForGuest(frame))
            {
                var asker = MacAddress.FromBytes(frame.AsSpan(22, 6));
                Assert.True(backend.Send(WithHeader(Ethernet(asker, GuestMac, EtherArp, Arp(2, GuestMac, GuestIp, asker, HostIp)))));
            }
        }
        throw new Xunit.Sdk.XunitException($"no such frame from the namespace's kernel within 10 s; saw {string.Join(", ", seen)}");
    }

    // ---------------------------------------------------------------- the backend alone

    [TapFact]
    public void The_namespace_kernel_answers_an_arp_request_and_an_icmp_echo_sent_through_the_tap()
    {
        using var ns = NetNamespace.Create();
        using var backend = TapNetBackend.Open(TapName());
        ns.Adopt(backend.Tap.Name, "10.211.0.1/24");

        var request = Ethernet(new MacAddress(0xFFFF_FFFF_FFFF), GuestMac, EtherArp,
            Arp(1, GuestMac, GuestIp, default, HostIp));
        Assert.True(backend.Send(WithHeader(request)));
        var reply = Await(backend, f => IsArpReplyToGuest(f));

        Assert.Equal(new byte[VirtioNetHeader.Size], reply[..VirtioNetHeader.Size]); // no offload asked: a plain header
        var frame = reply[VirtioNetHeader.Size..];
        var hostMac = MacAddress.FromBytes(frame.AsSpan(22, 6));
        Assert.Equal(hostMac, MacAddress.FromBytes(frame.AsSpan(6, 6)));
        Assert.Contains(hostMac.ToString(), IpTool.Run("-n", ns.Name, "link", "show", backend.Tap.Name));

        var data = "ActorVmm virtio-net over a TAP"u8.ToArray();
        Assert.True(backend.Send(WithHeader(Ethernet(hostMac, GuestMac, EtherIpv4, EchoRequest(0x4156, 1, data)))));
        var echo = Await(backend, f => IsEchoReply(f, 0x4156, 1))[VirtioNetHeader.Size..];

        Assert.Equal(GuestMac, MacAddress.FromBytes(echo.AsSpan(0, 6)));
        Assert.Equal(data, echo.AsSpan(42, data.Length).ToArray());
        Assert.Equal(0, InternetChecksum(echo.AsSpan(34, 8 + data.Length))); // the kernel's checksum is complete

        // TUNSETOFFLOAD takes every offload the model can ask for, and none again.
        backend.SetReceiveOffloads(NetOffloads.Checksum | NetOffloads.Tso4 | NetOffloads.Tso6);
        backend.SetReceiveOffloads(NetOffloads.None);
    }

    [TapFact]
    public void Opening_a_tap_that_another_reader_holds_or_a_name_that_is_not_a_tap_fails_with_the_cause()
    {
        using var first = TapNetBackend.Open(TapName());

        var busy = Assert.Throws<TapException>(() => TapNetBackend.Open(first.Tap.Name));
        Assert.Contains("in use", busy.Message);
        var notTap = Assert.Throws<TapException>(() => TapNetBackend.Open("lo"));
        Assert.Contains("not a TAP", notTap.Message);
    }

    [Theory]
    [InlineData("")]
    [InlineData("a-name-of-16-bytes")]
    [InlineData("has space")]
    [InlineData("a/b")]
    [InlineData("tap%d")]
    public void An_invalid_tap_name_is_refused_before_anything_is_opened(string name) =>
        Assert.Throws<TapException>(() => TapDevice.Open(name));

    // ---------------------------------------------------------------- the model over the TAP

    /// <summary>A guest's side of a virtio-net card over a TAP: the model, its two queues in
    /// <see cref="TestGuestMemory"/>, 16 receive buffers of 1536 bytes posted.</summary>
    private sealed class Guest
    {
        private const ushort Size = 16;
        private const ulong RxBuffers = 0x4_0000;
        private const ulong TxBuffers = 0x8_0000;
        private readonly TestGuestMemory _m = new();
        private readonly DriverRing _rx;
        private readonly DriverRing _tx;
        private readonly SplitVirtqueue _rxq;
        private readonly SplitVirtqueue _txq;
        private readonly TapNetBackend _backend;
        private int _seen;
        private ushort _nextTx;

        public VirtioNet Net { get; }

        public Guest(TapNetBackend backend, ulong features)
        {
            _backend = backend;
            _rx = new DriverRing(_m, Size);
            _tx = new DriverRing(_m, Size, desc: 0x1_8000, avail: 0x2_8000, used: 0x3_8000);
            var ram = new GuestRam(_m);
            _rxq = SplitVirtqueue.Enable(ram, Size, new GuestPhysAddr(_rx.Desc), new GuestPhysAddr(_rx.Avail), new GuestPhysAddr(_rx.Used), features);
            _txq = SplitVirtqueue.Enable(ram, Size, new GuestPhysAddr(_tx.Desc), new GuestPhysAddr(_tx.Avail), new GuestPhysAddr(_tx.Used), features);
            Net = new VirtioNet(_m, backend, GuestMac, () => features);
            for (ushort i = 0; i < Size; i++)
            {
                _rx.SetDesc(i, RxBuffers + 0x1000UL * i, 1536, DescWrite);
                _rx.MakeAvailable(i);
            }
        }

        /// <summary>The driver transmits header + frame (header and frame in two descriptors, as Linux).</summary>
        public void Transmit(byte[] packet)
        {
            var at = TxBuffers + 0x1000UL * _nextTx;
            Assert.True(_m.TryWrite(new GuestPhysAddr(at), packet));
            _tx.SetDesc(2 * _nextTx, at, VirtioNetHeader.Size, DescNext, (ushort)(2 * _nextTx + 1));
            _tx.SetDesc(2 * _nextTx + 1, at + VirtioNetHeader.Size, (uint)(packet.Length - VirtioNetHeader.Size));
            _tx.MakeAvailable((ushort)(2 * _nextTx));
            _nextTx++;
            Net.Process(VirtioNet.TransmitQueue, _txq);
            Assert.Equal(_nextTx, _tx.UsedIdx);
        }

        /// <summary>The owner's loop (the TAP's fd became readable → process the receive queue) until a
        /// received frame satisfies <paramref name="wanted"/>, for up to 10 s.</summary>
        public byte[] AwaitFrame(Func<byte[], bool> wanted)
        {
            var deadline = Stopwatch.StartNew();
            while (deadline.Elapsed < TimeSpan.FromSeconds(10))
            {
                if (!_backend.Tap.WaitReadable(100)) continue;
                Net.Process(VirtioNet.ReceiveQueue, _rxq);
                Assert.Null(_rxq.Error);
                for (; _seen < _rx.UsedIdx && _seen < Size; _seen++)
                {
                    var (id, len) = _rx.UsedElem(_seen);
                    var at = RxBuffers + 0x1000UL * id;
                    Assert.Equal(1, _m.U16(at + VirtioNetHeader.NumBuffersOffset)); // small frames: one buffer each
                    var frame = _m.Bytes(at + VirtioNetHeader.Size, (int)len - VirtioNetHeader.Size);
                    if (wanted(frame)) return frame;
                }
            }
            throw new Xunit.Sdk.XunitException($"no such frame in the guest's receive buffers within 10 s ({_seen} received)");
        }
    }

    private const ulong GuestFeatures = VirtioFeatures.Version1 | VirtioFeatures.EventIdx | VirtioNetFeatures.Mac | VirtioNetFeatures.MrgRxbuf;

    [TapFact]
    public void A_guest_arp_request_through_the_model_gets_the_kernels_reply_in_a_merged_receive_buffer()
    {
        using var ns = NetNamespace.Create();
        using var backend = TapNetBackend.Open(TapName());
        ns.Adopt(backend.Tap.Name, "10.211.0.1/24");
        var guest = new Guest(backend, GuestFeatures);

        guest.Transmit(WithHeader(Ethernet(new MacAddress(0xFFFF_FFFF_FFFF), GuestMac, EtherArp, Arp(1, GuestMac, GuestIp, default, HostIp))));
        Assert.Equal((1UL, 0UL), (guest.Net.TxFrames, guest.Net.TxDropped));
        var reply = guest.AwaitFrame(f => IsArpReplyToGuest(f));

        Assert.Equal(0UL, guest.Net.RxDropped);
        Assert.Equal(GuestMac, MacAddress.FromBytes(reply.AsSpan(32, 6))); // tha: the guest's address
    }

    [TapFact]
    public void A_guest_echo_request_with_a_partial_checksum_is_completed_by_the_host_and_answered()
    {
        using var ns = NetNamespace.Create();
        using var backend = TapNetBackend.Open(TapName());
        ns.Adopt(backend.Tap.Name, "10.211.0.1/24");
        var guest = new Guest(backend, GuestFeatures | VirtioNetFeatures.Csum);
        guest.Transmit(WithHeader(Ethernet(new MacAddress(0xFFFF_FFFF_FFFF), GuestMac, EtherArp, Arp(1, GuestMac, GuestIp, default, HostIp))));
        var hostMac = MacAddress.FromBytes(guest.AwaitFrame(f => IsArpReplyToGuest(f)).AsSpan(6, 6));

        // VIRTIO_NET_HDR_F_NEEDS_CSUM (§5.1.6.2): the ICMP checksum field (frame offset 34 + 2) is left 0
        // for the device to fill in. Without the flag reaching the TAP the kernel drops the request as
        // corrupt and never answers.
        var data = "checksum offloaded"u8.ToArray();
        var packet = WithHeader(Ethernet(hostMac, GuestMac, EtherIpv4, EchoRequest(0x4157, 2, data)));
        packet[VirtioNetHeader.Size + 34 + 2] = 0;
        packet[VirtioNetHeader.Size + 34 + 3] = 0;
        packet[0] = VirtioNetHeader.FlagNeedsCsum;
        BinaryPrimitives.WriteUInt16LittleEndian(packet.AsSpan(6), 34); // csum_start: the ICMP header
        BinaryPrimitives.WriteUInt16LittleEndian(packet.AsSpan(8), 2);  // csum_offset: its checksum field
        guest.Transmit(packet);
        var echo = guest.AwaitFrame(f => IsEchoReply(f, 0x4157, 2));

        Assert.Equal(data, echo.AsSpan(42, data.Length).ToArray());
        Assert.Equal((2UL, 0UL), (guest.Net.TxFrames, guest.Net.TxDropped));
    }
}
