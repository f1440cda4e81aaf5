using System.Buffers.Binary;
using System.Diagnostics.CodeAnalysis;
using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Virtio;

/// <summary>Why a virtqueue stopped: the driver broke a rule of virtio 1.2 §2.7 (or the ring left guest
/// RAM). Each one puts the device in DEVICE_NEEDS_RESET (§2.1.2); none is an exception.</summary>
public enum VirtqueueError
{
    /// <summary>queue_size is 0, not a power of two, or above 32768 (§2.7).</summary>
    InvalidQueueSize,
    /// <summary>A ring address is misaligned (descriptor table 16, available ring 2, used ring 4; §2.7)
    /// or the ring does not lie in guest RAM.</summary>
    RingOutsideRam,
    /// <summary>avail.idx moved more than queue_size entries past the last one the device took (§2.7.6):
    /// the driver cannot have made that many buffers available.</summary>
    AvailIndexJump,
    /// <summary>A head or <c>next</c> index is not below the size of its table (§2.7.5).</summary>
    DescriptorIndexOutOfRange,
    /// <summary>A buffer (address + length) is not inside guest RAM, or a write-only one is in read-only
    /// memory.</summary>
    BufferOutsideRam,
    /// <summary>The chain has more descriptors than queue_size, so it loops (§2.7.5.3.1: "A driver MUST
    /// NOT create a descriptor chain longer than the Queue Size of the device").</summary>
    ChainTooLong,
    /// <summary>The buffers of a chain add up to more than 2^32 bytes (§2.7.5.2).</summary>
    ChainTooLarge,
    /// <summary>A device-readable descriptor follows a device-writable one (§2.7.4.2, §2.7.5.2: "The
    /// driver MUST place any device-writable descriptor elements after any device-readable ones").</summary>
    ReadableAfterWritable,
    /// <summary>VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC negotiated (§2.7.5.3.1).</summary>
    IndirectNotNegotiated,
    /// <summary>An indirect table of 0 bytes or of a length that is not a multiple of 16 (§2.7.5.3).</summary>
    IndirectTableSize,
    /// <summary>VIRTQ_DESC_F_INDIRECT inside an indirect table (§2.7.5.3.1: one table per descriptor).</summary>
    NestedIndirect,
    /// <summary>VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT (§2.7.5.3.1).</summary>
    IndirectWithNext,
}

/// <summary>A buffer of one descriptor, checked to lie in guest RAM.</summary>
public readonly record struct GuestBuffer(GuestPhysAddr Address, uint Length);

/// <summary>One available descriptor chain: its head index (what goes back on the used ring) and its
/// buffers in chain order, device-readable ones first (§2.7.4).</summary>
public sealed record DescriptorChain(ushort Head, IReadOnlyList<GuestBuffer> Readable, IReadOnlyList<GuestBuffer> Writable)
{
    public ulong ReadableLength => Readable.Aggregate(0UL, (n, b) => n + b.Length);
    public ulong WritableLength => Writable.Aggregate(0UL, (n, b) => n + b.Length);
}

/// <summary>
/// What a split virtqueue needs to survive a device restart: the driver's configuration (size,
/// enable, the three ring addresses) and the device's indices. <see cref="SignalledUsed"/> is the used
/// index at the last interrupt decision (null: unknown, so the next decision interrupts; a spurious
/// interrupt is harmless, a lost one hangs the driver).
/// </summary>
public sealed record VirtqueueState(
    ushort Size,
    bool Enabled,
    ulong DescTable,
    ulong AvailRing,
    ulong UsedRing,
    ushort LastAvailIdx,
    ushort UsedIdx,
    ushort? SignalledUsed);

/// <summary>
/// The device side of a split virtqueue (virtio 1.2 §2.7) over guest memory:
/// <list type="bullet">
/// <item>descriptor table: <c>struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }[size]</c>,
/// 16-byte aligned;</item>
/// <item>available ring (driver area): <c>le16 flags; le16 idx; le16 ring[size]; le16 used_event;</c>,
/// 2-byte aligned;</item>
/// <item>used ring (device area): <c>le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size];
/// le16 avail_event;</c>, 4-byte aligned.</item>
/// </list>
/// Every address the driver supplies is checked against guest RAM before it is touched; a broken rule
/// sets <see cref="Error"/> (sticky until the device is reset) and the queue does nothing more. Nothing
/// the driver writes makes a method throw.
///
/// Memory ordering (§2.7.13, §2.7.14): the device reads avail.idx, then the ring entries; it writes a
/// used element before used.idx, and reads used_event / avail.flags only after used.idx is visible.
/// Full fences stand for the barriers; guest vcpus write the rings concurrently.
/// </summary>
public sealed class SplitVirtqueue
{
    public const ushort MaxSize = 32768;
    private const int DescriptorSize = 16;

    private readonly GuestRam _ram;
    private readonly IGuestMemory _memory;
    private readonly ushort _size;
    private readonly GuestPhysAddr _desc;
    private readonly GuestPhysAddr _avail;
    private readonly GuestPhysAddr _used;
    private readonly bool _eventIdx;
    private readonly bool _indirect;
    private ushort _lastAvail;
    private ushort _usedIdx;
    private ushort? _signalledUsed;

    /// <summary>The first rule the driver broke, or null while the queue works.</summary>
    public VirtqueueError? Error { get; private set; }

    public ushort Size => _size;
    public ushort LastAvailIdx => _lastAvail;
    public ushort UsedIdx => _usedIdx;

    private SplitVirtqueue(GuestRam ram, VirtqueueState state, ulong features)
    {
        _ram = ram;
        _memory = ram.Memory;
        _size = state.Size;
        _desc = new GuestPhysAddr(state.DescTable);
        _avail = new GuestPhysAddr(state.AvailRing);
        _used = new GuestPhysAddr(state.UsedRing);
        _eventIdx = (features & VirtioFeatures.EventIdx) != 0;
        _indirect = (features & VirtioFeatures.IndirectDesc) != 0;
        _lastAvail = state.LastAvailIdx;
        _usedIdx = state.UsedIdx;
        _signalledUsed = state.SignalledUsed;
        Error = CheckLayout();
    }

    /// <summary>A queue the driver just enabled: both indices start at 0 (§2.7: the driver zeroes the
    /// rings before enabling). <paramref name="features"/> are the negotiated ones (EVENT_IDX,
    /// INDIRECT_DESC). An invalid layout gives a queue with <see cref="Error"/> set.</summary>
    public static SplitVirtqueue Enable(GuestRam ram, ushort size, GuestPhysAddr desc, GuestPhysAddr avail, GuestPhysAddr used,
        ulong features) =>
        new(ram, new VirtqueueState(size, true, desc.Value, avail.Value, used.Value, 0, 0, 0), features);

    /// <summary>
    /// A queue continuing after a device restart. The used ring in guest memory is the truth: used.idx
    /// is read back, and the device resumes taking chains from there, so a chain it took but had not
    /// put on the used ring before the restart is taken again (not lost), and one it had put there is
    /// not (not doubled). That is exact for a device that completes chains in the order it takes them
    /// (rng, console, net); a device that completes out of order must keep its own in-flight list.
    /// </summary>
    public static SplitVirtqueue FromState(GuestRam ram, VirtqueueState state, ulong features)
    {
        var q = new SplitVirtqueue(ram, state, features);
        if (q.Error is not null) return q;
        if (!q.TryReadU16(q._used + 2, out var used) || !q.TryReadU16(q._avail + 2, out var avail)) return q;
        if ((ushort)(avail - used) > q._size) return q.FailQueue(VirtqueueError.AvailIndexJump);
        q._usedIdx = used;
        q._lastAvail = used;
        q._signalledUsed = null;
        return q;
    }

    public VirtqueueState State() =>
        new(_size, true, _desc.Value, _avail.Value, _used.Value, _lastAvail, _usedIdx, _signalledUsed);

    private VirtqueueError? CheckLayout()
    {
        if (_size == 0 || _size > MaxSize || (_size & (_size - 1)) != 0) return VirtqueueError.InvalidQueueSize;
        if (_desc.Value % 16 != 0 || _avail.Value % 2 != 0 || _used.Value % 4 != 0) return VirtqueueError.RingOutsideRam;
        if (!_ram.Contains(_desc, (ulong)_size * DescriptorSize, writable: false)
            || !_ram.Contains(_avail, 6 + 2UL * _size, writable: false)
            || !_ram.Contains(_used, 6 + 8UL * _size, writable: true))
            return VirtqueueError.RingOutsideRam;
        return null;
    }

    /// <summary>Whether the driver made a chain available that the device has not taken yet.</summary>
    public bool HasAvailable => Error is null && TryReadU16(_avail + 2, out var idx) && idx != _lastAvail;

    /// <summary>
    /// Takes the next available chain (§2.7.13): the head from avail.ring[last_avail_idx % size], then
    /// its descriptors, following an indirect table where one is given (§2.7.5.3.2: any number of
    /// direct descriptors followed by one indirect descriptor). False if none is available or the queue
    /// is broken; a chain that breaks a rule sets <see cref="Error"/> and is not taken.
    /// </summary>
    public bool TryPop([NotNullWhen(true)] out DescriptorChain? chain)
    {
        chain = null;
        if (Error is not null) return false;
        if (!TryReadU16(_avail + 2, out var availIdx)) return false;
        var pending = (ushort)(availIdx - _lastAvail);
        if (pending == 0) return false;
        if (pending > _size) return Broken(VirtqueueError.AvailIndexJump);
        Thread.MemoryBarrier(); // read the ring entry only after avail.idx
        if (!TryReadU16(_avail + 4 + 2UL * (ulong)(_lastAvail % _size), out var head)) return false;
        if (head >= _size) return Broken(VirtqueueError.DescriptorIndexOutOfRange);

        var readable = new List<GuestBuffer>();
        var writable = new List<GuestBuffer>();
        var table = _desc;
        uint tableSize = _size;
        var inIndirect = false;
        var index = (uint)head;
        var count = 0;
        ulong total = 0;
        Span<byte> d = stackalloc byte[DescriptorSize];
        while (true)
        {
            if (++count > _size) return Broken(VirtqueueError.ChainTooLong);
            if (!_memory.TryRead(table + (ulong)index * DescriptorSize, d)) return Broken(VirtqueueError.RingOutsideRam);
            var addr = new GuestPhysAddr(BinaryPrimitives.ReadUInt64LittleEndian(d));
            var len = BinaryPrimitives.ReadUInt32LittleEndian(d[8..]);
            var flags = BinaryPrimitives.ReadUInt16LittleEndian(d[12..]);
            var next = BinaryPrimitives.ReadUInt16LittleEndian(d[14..]);

            if ((flags & VirtqFlags.DescIndirect) != 0)
            {
                // §2.7.5.3: the descriptor's write flag is ignored; the table replaces the rest of the chain.
                if (inIndirect) return Broken(VirtqueueError.NestedIndirect);
                if (!_indirect) return Broken(VirtqueueError.IndirectNotNegotiated);
                if ((flags & VirtqFlags.DescNext) != 0) return Broken(VirtqueueError.IndirectWithNext);
                if (len == 0 || len % DescriptorSize != 0) return Broken(VirtqueueError.IndirectTableSize);
                if (!_ram.Contains(addr, len, writable: false))
                    return Broken(VirtqueueError.BufferOutsideRam);
                count--; // the table descriptor itself carries no buffer
                table = addr;
                tableSize = len / DescriptorSize;
                inIndirect = true;
                index = 0;
                continue;
            }

            var write = (flags & VirtqFlags.DescWrite) != 0;
            if (!_ram.Contains(addr, len, writable: write)) return Broken(VirtqueueError.BufferOutsideRam);
            total += len;
            if (total > 1UL << 32) return Broken(VirtqueueError.ChainTooLarge);
            if (write) writable.Add(new GuestBuffer(addr, len));
            else if (writable.Count > 0) return Broken(VirtqueueError.ReadableAfterWritable);
            else readable.Add(new GuestBuffer(addr, len));

            if ((flags & VirtqFlags.DescNext) == 0) break;
            if (next >= tableSize) return Broken(VirtqueueError.DescriptorIndexOutOfRange);
            index = next;
        }

        _lastAvail++;
        chain = new DescriptorChain(head, readable, writable);
        return true;
    }

    /// <summary>
    /// Returns a chain to the driver (§2.7.8, §2.7.14): used.ring[used_idx % size] = { head,
    /// <paramref name="writtenLength"/> }, then used.idx + 1. <paramref name="writtenLength"/> is the
    /// number of bytes the device wrote into the writable buffers (§2.7.8.1: at least that many).
    /// False if the queue is broken.
    /// </summary>
    public bool Push(ushort head, uint writtenLength)
    {
        if (Error is not null) return false;
        Span<byte> e = stackalloc byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(e, head);
        BinaryPrimitives.WriteUInt32LittleEndian(e[4..], writtenLength);
        if (!_memory.TryWrite(_used + 4 + 8UL * (ulong)(_usedIdx % _size), e)) return Broken(VirtqueueError.RingOutsideRam);
        Thread.MemoryBarrier(); // the element is visible before the index that publishes it
        _usedIdx++;
        return TryWriteU16(_used + 2, _usedIdx);
    }

    /// <summary>
    /// Returns several chains at once (§2.7.8, §2.7.14), in the order given: every used element is
    /// written first, then used.idx moves once by their count, so a driver reading the ring concurrently
    /// sees all of them or none (a merged receive frame, §5.1.6.4, must not be seen in part). False if
    /// the queue is broken.
    /// </summary>
    public bool Push(ReadOnlySpan<(ushort Head, uint WrittenLength)> used)
    {
        if (Error is not null) return false;
        Span<byte> e = stackalloc byte[8];
        for (var i = 0; i < used.Length; i++)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(e, used[i].Head);
            BinaryPrimitives.WriteUInt32LittleEndian(e[4..], used[i].WrittenLength);
            if (!_memory.TryWrite(_used + 4 + 8UL * (ulong)((ushort)(_usedIdx + i) % _size), e)) return Broken(VirtqueueError.RingOutsideRam);
        }
        Thread.MemoryBarrier(); // the elements are visible before the index that publishes them
        _usedIdx += (ushort)used.Length;
        return TryWriteU16(_used + 2, _usedIdx);
    }

    /// <summary>
    /// Whether the device must send a used-buffer notification for what it pushed since the last call
    /// (§2.7.7.2). With VIRTIO_F_EVENT_IDX: when used.idx passed used_event since the last notification,
    /// <c>(u16)(new - used_event - 1) &lt; (u16)(new - old)</c>; without: unless avail.flags has
    /// VIRTQ_AVAIL_F_NO_INTERRUPT. False if nothing was pushed since the last call, or the queue is broken.
    /// </summary>
    public bool NeedsInterrupt()
    {
        if (Error is not null) return false;
        var old = _signalledUsed;
        if (old == _usedIdx) return false;
        Thread.MemoryBarrier(); // used.idx is visible before the driver's suppression field is read
        _signalledUsed = _usedIdx;
        if (old is null) return true;
        if (_eventIdx)
        {
            if (!TryReadU16(_avail + 4 + 2UL * _size, out var usedEvent)) return false;
            return (ushort)(_usedIdx - usedEvent - 1) < (ushort)(_usedIdx - old.Value);
        }
        return TryReadU16(_avail, out var flags) && (flags & VirtqFlags.AvailNoInterrupt) == 0;
    }

    /// <summary>Asks the driver not to notify (§2.7.10): VIRTQ_USED_F_NO_NOTIFY in used.flags without
    /// EVENT_IDX; with EVENT_IDX nothing is written (avail_event already lies behind).</summary>
    public void DisableNotifications()
    {
        if (Error is null && !_eventIdx) TryWriteU16(_used, VirtqFlags.UsedNoNotify);
    }

    /// <summary>
    /// Asks the driver to notify on its next available buffer (§2.7.10): clears used.flags, or with
    /// EVENT_IDX sets avail_event to last_avail_idx. Returns whether a chain became available meanwhile
    /// (the driver may have checked the old value), so the caller must pop again before sleeping.
    /// </summary>
    public bool EnableNotifications()
    {
        if (Error is not null) return false;
        if (_eventIdx) TryWriteU16(_used + 4 + 8UL * _size, _lastAvail);
        else TryWriteU16(_used, 0);
        Thread.MemoryBarrier(); // the request is visible before avail.idx is read again
        return HasAvailable;
    }

    private VirtqueueError? Fail(VirtqueueError error)
    {
        Error ??= error;
        return Error;
    }

    private bool Broken(VirtqueueError error)
    {
        Fail(error);
        return false;
    }

    private SplitVirtqueue FailQueue(VirtqueueError error)
    {
        Fail(error);
        return this;
    }

    private bool TryReadU16(GuestPhysAddr a, out ushort value)
    {
        Span<byte> b = stackalloc byte[2];
        if (!_memory.TryRead(a, b))
        {
            value = 0;
            Fail(VirtqueueError.RingOutsideRam);
            return false;
        }
        value = BinaryPrimitives.ReadUInt16LittleEndian(b);
        return true;
    }

    private bool TryWriteU16(GuestPhysAddr a, ushort value)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, value);
        if (_memory.TryWrite(a, b)) return true;
        Fail(VirtqueueError.RingOutsideRam);
        return false;
    }
}
