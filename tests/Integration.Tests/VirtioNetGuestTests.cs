using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.InteropServices;
using ActorVmm.Devices;
using ActorVmm.Devices.Virtio;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// A theory that needs KVM (as <see cref="KvmTheoryAttribute"/>) and a TAP interface in a network namespace
/// of its own: root (CAP_NET_ADMIN), /dev/net/tun and iproute2's <c>ip</c>. Skipped naming what is
/// missing; the KVM box has all three (it loads the tun module).
/// </summary>
[AttributeUsage(AttributeTargets.Method, AllowMultiple = false)]
public sealed class KvmTapTheoryAttribute : TheoryAttribute
{
    public KvmTapTheoryAttribute()
    {
        if (KvmRequirement.SkipReason is { } kvm) Skip = kvm;
        else if (IpTool.Unavailability() is { } tap) Skip = tap;
    }
}

/// <summary>
/// A network namespace made for one test (<c>ip netns add</c>) with a TAP interface in it, up, made the
/// way a user makes one for a VM (<c>ip tuntap add NAME mode tap</c>); deleted on dispose. The VM attaches
/// to the TAP from a thread inside the namespace (<see cref="InNamespace{T}"/>), and the test sees the
/// interface through a packet socket opened there (<see cref="PacketSocket"/>).
/// </summary>
internal sealed partial class TapNamespace : IDisposable
{
    private const int CloneNewNet = 0x4000_0000;

    public string Name { get; }
    public string Tap { get; }

    private TapNamespace(string name, string tap)
    {
        Name = name;
        Tap = tap;
    }

    [LibraryImport("libc", EntryPoint = "setns", SetLastError = true)]
    private static partial int Setns(int fd, int nstype);

    public static TapNamespace Create()
    {
        var tag = $"{Environment.ProcessId % 100000:x}{Random.Shared.Next(0x10000):x4}";
        var ns = new TapNamespace($"avm-net-{tag}", $"avt{tag}");
        IpTool.Run("netns", "add", ns.Name);
        try
        {
            IpTool.Run("-n", ns.Name, "tuntap", "add", "dev", ns.Tap, "mode", "tap");
            // No IPv6 link-local address: the kernel then sends nothing of its own on the interface (no
            // DAD, router solicitation or MLD report), so the only frame the guest receives is the test's
            // and the guest never notifies its receive queue after posting its buffers: the frame can
            // reach it only through the VMM's watcher of the TAP.
            IpTool.Run("-n", ns.Name, "link", "set", ns.Tap, "addrgenmode", "none");
            IpTool.Run("-n", ns.Name, "link", "set", ns.Tap, "up");
        }
        catch
        {
            ns.Dispose();
            throw;
        }
        return ns;
    }

    /// <summary>Runs <paramref name="work"/> on a thread that entered the namespace (setns(2) changes
    /// only the calling thread's), so what it opens (a TAP, a socket) belongs to the namespace.</summary>
    public T InNamespace<T>(Func<T> work)
    {
        T result = default!;
        Exception? error = null;
        var thread = new Thread(() =>
        {
            try
            {
                using var handle = File.OpenHandle($"/run/netns/{Name}");
                if (Setns((int)handle.DangerousGetHandle(), CloneNewNet) != 0)
                    throw new InvalidOperationException($"setns({Name}) failed: errno {Marshal.GetLastPInvokeError()}");
                result = work();
            }
            catch (Exception e) { error = e; }
        }) { Name = $"in-{Name}" };
        thread.Start();
        thread.Join();
        if (error is not null) throw new InvalidOperationException($"in network namespace {Name}: {error.Message}", error);
        return result;
    }

    public PacketSocket OpenPacketSocket() => InNamespace(() => PacketSocket.Bind(Tap));

    public void Dispose()
    {
        try { IpTool.Run("-n", Name, "link", "del", Tap); }
        catch (InvalidOperationException) { } // gone with its namespace anyway
        IpTool.Run("netns", "del", Name);
    }
}

/// <summary>A raw AF_PACKET socket bound to one interface (packet(7)): every frame the interface receives
/// or sends, whole; <see cref="Send"/> puts a frame on it (for a TAP: into its reader, the VM).</summary>
internal sealed partial class PacketSocket : IDisposable
{
    private const int AfPacket = 17;
    private const int SockRaw = 3;
    private const ushort EthPAll = 0x0003;
    private const short PollIn = 1;

    private readonly int _fd;

    private PacketSocket(int fd) => _fd = fd;

    [StructLayout(LayoutKind.Sequential)]
    private struct PollFd { public int Fd; public short Events; public short Revents; }

    [LibraryImport("libc", EntryPoint = "socket", SetLastError = true)]
    private static partial int Socket(int domain, int type, int protocol);

    [LibraryImport("libc", EntryPoint = "bind", SetLastError = true)]
    private static partial int BindTo(int fd, byte[] address, int length);

    [LibraryImport("libc", EntryPoint = "if_nametoindex", StringMarshalling = StringMarshalling.Utf8)]
    private static partial uint IfNameToIndex(string name);

    [LibraryImport("libc", EntryPoint = "recv", SetLastError = true)]
    private static partial nint Recv(int fd, byte[] buffer, nint length, int flags);

    [LibraryImport("libc", EntryPoint = "send", SetLastError = true)]
    private static partial nint SendTo(int fd, byte[] buffer, nint length, int flags);

    [LibraryImport("libc", EntryPoint = "poll", SetLastError = true)]
    private static partial int Poll(ref PollFd fds, nuint count, int timeout);

    [LibraryImport("libc", EntryPoint = "close")]
    private static partial int Close(int fd);

    /// <summary>Bound to <paramref name="name"/> in the calling thread's network namespace.</summary>
    public static PacketSocket Bind(string name)
    {
        var index = IfNameToIndex(name);
        if (index == 0) throw new InvalidOperationException($"no interface {name}");
        var fd = Socket(AfPacket, SockRaw, BinaryPrimitives.ReverseEndianness(EthPAll));
        if (fd < 0) throw new InvalidOperationException($"socket(AF_PACKET) failed: errno {Marshal.GetLastPInvokeError()}");
        // struct sockaddr_ll: family, protocol (network order), ifindex, hatype, pkttype, halen, addr[8].
        var sll = new byte[20];
        BinaryPrimitives.WriteUInt16LittleEndian(sll, AfPacket);
        BinaryPrimitives.WriteUInt16BigEndian(sll.AsSpan(2), EthPAll);
        BinaryPrimitives.WriteInt32LittleEndian(sll.AsSpan(4), (int)index);
        if (BindTo(fd, sll, sll.Length) != 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            Close(fd);
            throw new InvalidOperationException($"bind(AF_PACKET, {name}) failed: errno {errno}");
        }
        return new PacketSocket(fd);
    }

    /// <summary>The next frame within <paramref name="timeout"/> for which <paramref name="wanted"/> holds
    /// (others are skipped); null if none came.</summary>
    public byte[]? Receive(Func<byte[], bool> wanted, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        var buffer = new byte[65536];
        while (true)
        {
            var left = (int)Math.Max(0, (deadline - DateTime.UtcNow).TotalMilliseconds);
            var pfd = new PollFd { Fd = _fd, Events = PollIn };
            if (Poll(ref pfd, 1, left) <= 0) return null;
            var n = Recv(_fd, buffer, buffer.Length, 0);
            if (n < 0) throw new InvalidOperationException($"recv failed: errno {Marshal.GetLastPInvokeError()}");
            var frame = buffer[..(int)n];
            if (wanted(frame)) return frame;
        }
    }

    public void Send(byte[] frame)
    {
        if (SendTo(_fd, frame, frame.Length, 0) != frame.Length)
            throw new InvalidOperationException($"send on the packet socket failed: errno {Marshal.GetLastPInvokeError()}");
    }

    public void Dispose() => Close(_fd);
}

/// <summary>
/// A real guest drives the virtio network card (<c>--net tap=NAME</c>, PCI 00:04.0) on a TAP interface in a
/// network namespace the test made, as a driver does (virtio 1.2 §5.1, §4.1): it finds the card on bus 0,
/// places its BAR, turns on MSI-X (a vector per queue and one for configuration changes), negotiates
/// VIRTIO_F_VERSION_1 only (so every frame carries the 12-byte header), sets up receiveq1 with four 2 KiB
/// buffers and transmitq1, and transmits a frame the test chose. The test reads that frame off the TAP
/// through a packet socket, byte for byte, then sends a frame of its own into the TAP; the guest, asleep in
/// <c>hlt</c>, is woken by the receive queue's MSI-X interrupt (the VMM's watcher saw the TAP readable and
/// told the device, the guest never polls), skips any frame that is not the test's (the kernel may send its
/// own on a fresh interface) by posting its buffer again, and reports which buffer holds the test's frame;
/// the test checks its header and bytes in guest memory.
/// </summary>
public sealed class VirtioNetGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong RxDesc = 0x20_0000;
    private const ulong RxAvail = 0x20_1000;
    private const ulong RxUsed = 0x20_2000;
    private const ulong TxDesc = 0x21_0000;
    private const ulong TxAvail = 0x21_1000;
    private const ulong TxUsed = 0x21_2000;
    private const ulong RxBuffers = 0x22_0000;  // four buffers of RxBufferLength
    private const int RxBufferLength = 0x800;
    private const int RxBufferCount = 4;
    private const ulong TxPacket = 0x23_0000;   // virtio_net_hdr (zeroes) + the frame
    private const ushort QueueSize = 8;

    private const ulong Seen = 0x9F900;         // bytes: the rx, tx, config handler ran
    private const ulong Report = 0x9F910;       // dwords: id and length of the used buffer with the test's frame
    private const ulong NotifyRx = 0x9F920;     // qword: receiveq1's notify address
    private const ulong NotifyTx = 0x9F928;     // qword: transmitq1's notify address

    private const byte RxVector = 0x51;         // MSI-X table entry 0
    private const byte TxVector = 0x52;         // entry 1
    private const byte ConfigVector = 0x53;     // entry 2

    /// <summary>IEEE 802 "local experimental" EtherType 1: the test's frames, told apart from the kernel's.</summary>
    private const ushort EtherType = 0x88B5;

    private static readonly MacAddress GuestMac = new(0x5254_00AB_CDEF);

    [KvmTapTheory]
    [InlineData(LapicMode.Emulated)]
    [InlineData(LapicMode.Assisted)]
    public async Task A_guest_driver_exchanges_frames_with_the_test_over_a_tap_in_a_network_namespace(LapicMode lapic)
    {
        using var ns = TapNamespace.Create();
        using var socket = ns.OpenPacketSocket();
        var toHost = Frame(new MacAddress(0xFFFF_FFFF_FFFF), GuestMac, seed: 1);
        var toGuest = Frame(GuestMac, new MacAddress(0x0200_0000_0042), seed: 2);
        var gate = new HostGate();
        var spec = new VmSpec("net", 16 << 20, 1, Build(toHost, hostile: false), lapic) { Net = new NetSpec(ns.Tap, GuestMac) };
        await using var run = await ns.InNamespace(() => GuestRun.StartAsync(spec, gate.Device()));

        await gate.ReachedAsync(1, run, TimeSpan.FromMinutes(3)); // its frame went out, its receive buffers are posted
        var seen = socket.Receive(f => IsTests(f) && f.AsSpan(6, 6).SequenceEqual(Bytes(GuestMac)), TimeSpan.FromSeconds(30));
        Assert.NotNull(seen);
        Assert.Equal(Convert.ToHexString(toHost), Convert.ToHexString(seen));
        socket.Send(toGuest);

        var outcome = await run.WaitAsync();
        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status {outcome.ExitCode >> 1})");
        var report = new byte[8];
        Assert.True(run.Vm.Memory.TryRead(new GuestPhysAddr(Report), report));
        var id = BinaryPrimitives.ReadUInt32LittleEndian(report);
        var length = BinaryPrimitives.ReadUInt32LittleEndian(report.AsSpan(4));
        Assert.InRange(id, 0u, (uint)RxBufferCount - 1);
        Assert.Equal((uint)(VirtioNetHeader.Size + toGuest.Length), length);
        var packet = new byte[length];
        Assert.True(run.Vm.Memory.TryRead(new GuestPhysAddr(RxBuffers + id * RxBufferLength), packet));
        // §5.1.6.4: flags 0, gso_type NONE, num_buffers 1 (VERSION_1 without MRG_RXBUF).
        Assert.Equal("000000000000000000000100", Convert.ToHexString(packet[..VirtioNetHeader.Size]));
        Assert.Equal(Convert.ToHexString(toGuest), Convert.ToHexString(packet[VirtioNetHeader.Size..]));
        var status = await run.StatusAsync();
        Assert.Empty(status.Restarts ?? []);
    }

    /// <summary>A transmit descriptor outside guest RAM: the card touches nothing, sends nothing to the TAP,
    /// sets DEVICE_NEEDS_RESET and signals a configuration change (§2.1.2, §4.1.5.4); the guest sees both,
    /// resets the card and the VM goes on to its exit; the device actor never failed.</summary>
    [KvmTapTheory]
    [InlineData(LapicMode.Emulated)]
    public async Task A_transmit_chain_outside_ram_marks_the_card_broken_and_nothing_reaches_the_tap(LapicMode lapic)
    {
        using var ns = TapNamespace.Create();
        using var socket = ns.OpenPacketSocket();
        var toHost = Frame(new MacAddress(0xFFFF_FFFF_FFFF), GuestMac, seed: 3);
        var spec = new VmSpec("net", 16 << 20, 1, Build(toHost, hostile: true), lapic) { Net = new NetSpec(ns.Tap, GuestMac) };
        await using var run = await ns.InNamespace(() => GuestRun.StartAsync(spec));

        var outcome = await run.WaitAsync();
        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status {outcome.ExitCode >> 1})");
        Assert.Null(socket.Receive(f => f.AsSpan(6, 6).SequenceEqual(Bytes(GuestMac)), TimeSpan.FromSeconds(1)));
        var status = await run.StatusAsync();
        Assert.Empty(status.Restarts ?? []);
    }

    private static bool IsTests(byte[] frame) => frame.Length >= 14 && BinaryPrimitives.ReadUInt16BigEndian(frame.AsSpan(12)) == EtherType;

    private static byte[] Bytes(MacAddress mac)
    {
        var b = new byte[MacAddress.Length];
        mac.CopyTo(b);
        return b;
    }

    /// <summary>A 60-byte Ethernet frame (the minimum without FCS): destination, source, the test's
    /// EtherType, 46 bytes of payload from <paramref name="seed"/>.</summary>
    private static byte[] Frame(MacAddress to, MacAddress from, int seed)
    {
        var f = new byte[60];
        to.CopyTo(f);
        from.CopyTo(f.AsSpan(6));
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(12), EtherType);
        new Random(seed).NextBytes(f.AsSpan(14));
        return f;
    }

    /// <summary>
    /// The guest. Registers it keeps: R15 the slot, RBP the function's ECAM page, R14 BAR 0's address, R8
    /// the common configuration, R9 the notify structure, R10 the notify-off multiplier, R11 the ISR, R12 the
    /// MSI-X capability's offset, R13 the MSI-X table; later R12 the receive used index seen, R13 the
    /// receive avail index.
    /// </summary>
    private static LongModeImage Build(byte[] frame, bool hostile)
    {
        var a = new Assembler(64);
        var fail = a.CreateLabel();
        var hltTx = a.CreateLabel();
        var hltRx = a.CreateLabel();
        var handlers = new[] { (RxVector, a.CreateLabel(), 0), (TxVector, a.CreateLabel(), 1), (ConfigVector, a.CreateLabel(), 2) };
        var driver = new VirtioDriverCode(a, fail);
        void Check(byte status, Action<Label> jumpIfBad) => driver.Check(status, jumpIfBad);

        foreach (var (vector, handler, _) in handlers) InterruptCode.SetGate(a, vector, handler);
        InterruptCode.EnableLocalApic(a);

        // 1. Find vendor 0x1AF4, device 0x1041 (virtio 1.x network card, §4.1.2) on bus 0: in its slot, of
        // class network controller, Ethernet.
        driver.Find(VirtioNet.VirtioDeviceId, () =>
        {
            a.cmp(r15d, PcPlatform.VirtioNetSlot);
            Check(3, l => a.jne(l));
            driver.ConfigRead32(0x08);
            a.shr(eax, 16);
            a.cmp(eax, 0x0200);
            Check(4, l => a.jne(l));
        });

        // 2. BAR 0 at the memory window's base; memory space and bus mastering on.
        driver.PlaceBar(Platform.PciMmioWindowBase);

        // 3. The capability list through ECAM: MSI-X and the virtio structures.
        driver.WalkCapabilities(checkBar: false);

        // 4. MSI-X: entries 0-2 to APIC 0 with the rx, tx and configuration vectors; MSI-X Enable.
        foreach (var (vector, _, entry) in handlers)
        {
            a.mov(__dword_ptr[r13 + 16 * entry], unchecked((int)0xFEE0_0000));
            a.mov(__dword_ptr[r13 + 16 * entry + 4], 0);
            a.mov(__dword_ptr[r13 + 16 * entry + 8], vector);
            a.mov(__dword_ptr[r13 + 16 * entry + 12], 0);
        }
        a.mov(__word_ptr[rbp + r12 + 2], 0x8000);

        // 5. Rings and buffers zeroed; the frame after a zero virtio_net_hdr (no offload asked).
        a.mov(rdi, (long)RxDesc);
        a.xor(eax, eax);
        a.mov(ecx, (int)(TxPacket + 0x1000 - RxDesc));
        a.rep.stosb();
        a.mov(rdi, (long)TxPacket + VirtioNetHeader.Size);
        for (var i = 0; i < frame.Length; i += 4)
            a.mov(__dword_ptr[rdi + i], BinaryPrimitives.ReadInt32LittleEndian(frame.AsSpan(i)));

        // 6. Initialisation (§3.1.1): VERSION_1 only, the configuration vector, both queues, DRIVER_OK.
        a.mov(__byte_ptr[r8 + 0x14], 0);
        a.mov(__byte_ptr[r8 + 0x14], 1);
        a.mov(__byte_ptr[r8 + 0x14], 3);
        a.mov(__dword_ptr[r8 + 0x00], 1);
        a.test(__dword_ptr[r8 + 0x04], 1);
        Check(14, l => a.jz(l));
        a.mov(__dword_ptr[r8 + 0x08], 0);
        a.mov(__dword_ptr[r8 + 0x0C], 0);
        a.mov(__dword_ptr[r8 + 0x08], 1);
        a.mov(__dword_ptr[r8 + 0x0C], 1);
        a.mov(__byte_ptr[r8 + 0x14], 0xB);
        a.test(__byte_ptr[r8 + 0x14], 0x8);
        Check(15, l => a.jz(l));
        a.mov(__word_ptr[r8 + 0x10], 2);                     // config_msix_vector: entry 2
        a.cmp(__word_ptr[r8 + 0x10], 2);
        Check(16, l => a.jne(l));
        foreach (var (queue, desc, avail, used, notify, status) in new[]
                 { (0, RxDesc, RxAvail, RxUsed, NotifyRx, (byte)17), (1, TxDesc, TxAvail, TxUsed, NotifyTx, (byte)18) })
        {
            a.mov(__word_ptr[r8 + 0x16], (short)queue);
            a.cmp(__word_ptr[r8 + 0x18], QueueSize);
            Check(status, l => a.jb(l));
            a.mov(__word_ptr[r8 + 0x18], QueueSize);
            a.mov(__word_ptr[r8 + 0x1A], (short)queue);      // queue q's vector: entry q
            a.cmp(__word_ptr[r8 + 0x1A], (short)queue);
            Check(status, l => a.jne(l));
            a.mov(rax, (long)desc);
            a.mov(__qword_ptr[r8 + 0x20], rax);
            a.mov(rax, (long)avail);
            a.mov(__qword_ptr[r8 + 0x28], rax);
            a.mov(rax, (long)used);
            a.mov(__qword_ptr[r8 + 0x30], rax);
            a.movzx(eax, __word_ptr[r8 + 0x1E]);
            a.imul(eax, r10d);
            a.add(rax, r9);
            a.mov(rdi, (long)notify);
            a.mov(__qword_ptr[rdi], rax);
            a.mov(__word_ptr[r8 + 0x1C], 1);
        }
        a.mov(__byte_ptr[r8 + 0x14], 0xF);
        a.cmp(__byte_ptr[r8 + 0x14], 0xF);
        Check(19, l => a.jne(l));

        // 7. Four device-writable receive buffers, made available, notified.
        a.mov(rdi, (long)RxDesc);
        a.mov(rsi, (long)RxAvail);
        for (var i = 0; i < RxBufferCount; i++)
        {
            a.mov(rax, (long)RxBuffers + i * RxBufferLength);
            a.mov(__qword_ptr[rdi + 16 * i], rax);
            a.mov(__dword_ptr[rdi + 16 * i + 8], RxBufferLength);
            a.mov(__word_ptr[rdi + 16 * i + 12], 2);         // VIRTQ_DESC_F_WRITE
            a.mov(__word_ptr[rsi + 4 + 2 * i], (short)i);
        }
        a.mov(__word_ptr[rsi + 2], RxBufferCount);
        a.mov(rdi, (long)NotifyRx);
        a.mov(rdi, __qword_ptr[rdi]);
        a.mov(__word_ptr[rdi], 0);

        // 8. One transmit chain: header + frame (or, hostile, a buffer outside RAM), notified.
        a.mov(rdi, (long)TxDesc);
        a.mov(rax, hostile ? 0x8000_0000L : (long)TxPacket);
        a.mov(__qword_ptr[rdi], rax);
        a.mov(__dword_ptr[rdi + 8], VirtioNetHeader.Size + frame.Length);
        a.mov(__word_ptr[rdi + 12], 0);
        a.mov(rsi, (long)TxAvail);
        a.mov(__word_ptr[rsi + 4], 0);
        a.mov(__word_ptr[rsi + 2], 1);
        a.mov(rdi, (long)NotifyTx);
        a.mov(rdi, __qword_ptr[rdi]);
        a.mov(__word_ptr[rdi], 1);

        // 9. Sleep until the transmit interrupt (hostile: the configuration change) came.
        var txWait = a.CreateLabel();
        var txDone = a.CreateLabel();
        a.Label(ref txWait);
        a.cli();
        a.mov(rdi, (long)Seen);
        a.cmp(__byte_ptr[rdi + (hostile ? 2 : 1)], 1);
        a.je(txDone);
        InterruptCode.SleepWithInterruptsOn(a, hltTx);
        a.jmp(txWait);
        a.Label(ref txDone);

        if (hostile)
        {
            a.test(__byte_ptr[r8 + 0x14], 0x40);             // DEVICE_NEEDS_RESET
            Check(21, l => a.jz(l));
            a.mov(rdi, (long)TxUsed);
            a.cmp(__word_ptr[rdi + 2], 0);                   // nothing used
            Check(22, l => a.jne(l));
            a.mov(__byte_ptr[r8 + 0x14], 0);                 // reset
            a.cmp(__byte_ptr[r8 + 0x14], 0);
            Check(23, l => a.jne(l));
        }
        else
        {
            a.mov(rdi, (long)TxUsed);
            a.cmp(__word_ptr[rdi + 2], 1);                   // used idx 1: { id 0, len 0 }
            Check(24, l => a.jne(l));
            a.cmp(__dword_ptr[rdi + 4], 0);
            Check(25, l => a.jne(l));

            // 10. Tell the test (it reads the frame off the TAP and sends its own), then sleep until
            // receive buffers come back used; skip frames that are not the test's (post them again).
            a.mov(eax, 1);
            a.mov(dx, HostGate.Port);
            a.@out(dx, eax);
            a.xor(r12d, r12d);                               // used entries seen
            a.mov(r13d, RxBufferCount);                      // avail idx
            var rxWait = a.CreateLabel();
            var got = a.CreateLabel();
            var ours = a.CreateLabel();
            a.Label(ref rxWait);
            a.cli();
            a.mov(rdi, (long)RxUsed);
            a.cmp(__word_ptr[rdi + 2], r12w);
            a.jne(got);
            InterruptCode.SleepWithInterruptsOn(a, hltRx);
            a.jmp(rxWait);
            a.Label(ref got);
            a.mov(eax, r12d);
            a.and(eax, QueueSize - 1);
            a.mov(edx, __dword_ptr[rdi + rax * 8 + 4]);      // id
            a.mov(ecx, __dword_ptr[rdi + rax * 8 + 8]);      // len
            a.inc(r12d);
            a.cmp(edx, RxBufferCount);
            Check(26, l => a.jae(l));
            a.mov(rsi, rdx);
            a.shl(rsi, 11);
            a.mov(rax, (long)RxBuffers);
            a.add(rsi, rax);
            a.cmp(__word_ptr[rsi + VirtioNetHeader.Size + 12], unchecked((short)BinaryPrimitives.ReverseEndianness(EtherType)));
            a.je(ours);
            a.mov(eax, r13d);                                // not the test's: the buffer goes back
            a.and(eax, QueueSize - 1);
            a.mov(rsi, (long)RxAvail);
            a.mov(__word_ptr[rsi + rax * 2 + 4], dx);
            a.inc(r13d);
            a.mov(__word_ptr[rsi + 2], r13w);
            a.mov(rsi, (long)NotifyRx);
            a.mov(rsi, __qword_ptr[rsi]);
            a.mov(__word_ptr[rsi], 0);
            a.jmp(rxWait);
            a.Label(ref ours);
            a.mov(rdi, (long)Report);
            a.mov(__dword_ptr[rdi], edx);
            a.mov(__dword_ptr[rdi + 4], ecx);
            a.mov(rdi, (long)Seen);
            a.cmp(__byte_ptr[rdi], 1);                       // the receive queue's vector came
            Check(27, l => a.jne(l));
        }
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref fail);
        a.mov(al, bl);
        a.@out(0xF4, al);
        a.hlt();

        // Handlers: mark their byte in Seen, EOI.
        foreach (var (_, handler, entry) in handlers)
        {
            var label = handler;
            a.Label(ref label);
            InterruptCode.ReturnPastInterruptedHlt(a, hltTx);
            if (!hostile) InterruptCode.ReturnPastInterruptedHlt(a, hltRx); // the hostile guest never sleeps there
            a.push(rax);
            a.push(rdi);
            a.mov(rdi, (long)Seen);
            a.mov(__byte_ptr[rdi + entry], 1);
            InterruptCode.Eoi(a);
            a.pop(rdi);
            a.pop(rax);
            a.iretq();
        }
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }
}
