using System.Buffers.Binary;

namespace ActorVmm.LibVmm;

/// <summary>An access to guest memory outside every segment, or a write to a read-only one.</summary>
public sealed class GuestMemoryException(string message) : VmmException(message);

/// <summary>
/// Guest-physical memory as loaders and devices see it: bounds-checked reads and writes through the
/// host view. Loaders depend on this, not on the vmspace actor.
/// </summary>
public interface IGuestMemory
{
    /// <summary>Copies guest memory into <paramref name="destination"/>; false if any byte is unmapped.</summary>
    bool TryRead(GuestPhysAddr address, Span<byte> destination);

    /// <summary>Copies into guest memory; false if any byte is unmapped (nothing is written then).
    /// Loaders may write read-only (firmware) segments; the guest cannot.</summary>
    bool TryWrite(GuestPhysAddr address, ReadOnlySpan<byte> source);

    /// <summary>Whether the whole range is backed by memory.</summary>
    bool IsMapped(GuestPhysAddr address, ulong length);

    /// <summary>The backed ranges in address order (for memory maps handed to a guest).</summary>
    IReadOnlyList<GuestRange> Ranges { get; }

    /// <summary>
    /// The host's view of [<paramref name="address"/>, +<paramref name="length"/>) as one block of
    /// memory, so that a device can transfer between a file or socket and guest memory without a bounce
    /// copy (a vectored pread/pwrite straight into it); empty if the range is not inside one backed
    /// segment (or the memory has no host view), in which case the caller copies with
    /// <see cref="TryRead"/> / <see cref="TryWrite"/>. Like TryWrite it does not tell RAM from firmware:
    /// a device checks that a buffer it writes is RAM before it asks. The memory is valid while the
    /// guest memory is (the VM's lifetime); the guest may change the bytes under it.
    /// </summary>
    Memory<byte> HostMemory(GuestPhysAddr address, int length) => default;

    /// <summary>Tells the memory that the host wrote [<paramref name="address"/>, +<paramref name="length"/>)
    /// through <see cref="HostMemory"/>, after the write: a write log (<see cref="GuestMemoryMap.LogHostWrites"/>)
    /// sees only writes it is told of. <see cref="TryWrite"/> tells itself.</summary>
    void Written(GuestPhysAddr address, ulong length) { }
}

/// <summary>A backed range of guest-physical space; read-only ranges are firmware, not RAM.</summary>
public readonly record struct GuestRange(GuestPhysAddr Base, ulong Size, bool ReadOnly)
{
    public ulong End => Base.Value + Size;
}

public static class GuestMemoryExtensions
{
    public static void Read(this IGuestMemory memory, GuestPhysAddr address, Span<byte> destination)
    {
        if (!memory.TryRead(address, destination))
            throw new GuestMemoryException($"read of {destination.Length} bytes at {address} is outside guest memory");
    }

    public static void Write(this IGuestMemory memory, GuestPhysAddr address, ReadOnlySpan<byte> source)
    {
        if (!memory.TryWrite(address, source))
            throw new GuestMemoryException($"write of {source.Length} bytes at {address} is outside guest memory");
    }

    /// <summary>A 64-bit value in guest memory, little-endian (x86's byte order).</summary>
    public static ulong ReadUInt64(this IGuestMemory memory, GuestPhysAddr address)
    {
        Span<byte> b = stackalloc byte[8];
        memory.Read(address, b);
        return BinaryPrimitives.ReadUInt64LittleEndian(b);
    }

    /// <summary>Writes a 64-bit value to guest memory, little-endian (x86's byte order).</summary>
    public static void WriteUInt64(this IGuestMemory memory, GuestPhysAddr address, ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(b, value);
        memory.Write(address, b);
    }
}

/// <summary>
/// A memfd (shmem) of a given size mapped twice, MAP_SHARED|MAP_NORESERVE: the guest view (given
/// to KVM as a memslot, later registered with userfaultfd) and the host view (for devices and
/// loaders). Untouched pages cost nothing, so a sparse guest stays small. Both views start on a
/// 2 MiB boundary (like the memfd offset 0 they map), so where the host backs the memfd with
/// transparent huge pages (<see cref="AdviseHugePages"/>) they can be mapped by one PMD each, and
/// KVM can map them with one 2 MiB EPT entry.
/// </summary>
public sealed unsafe class MemfdRegion : IDisposable
{
    private int _fd;

    public string Name { get; }
    public ulong Size { get; }
    public nint GuestView { get; private set; }
    public nint HostView { get; private set; }
    public int Fd => _fd;

    public MemfdRegion(string name, ulong size)
    {
        if (size == 0 || size % 4096 != 0) throw new ArgumentException($"region size 0x{size:X} is not a positive multiple of 4 KiB");
        Name = name;
        Size = size;
        _fd = Native.MemfdCreate("actorvmm-" + name, Native.MFD_CLOEXEC);
        if (_fd < 0) throw KvmException.Last($"memfd_create({name})");
        try
        {
            if (Native.Ftruncate(_fd, (long)size) != 0) throw KvmException.Last($"ftruncate({name}, 0x{size:X})");
            GuestView = Map();
            HostView = Map();
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>Views are aligned to this (the x86-64 PMD size).</summary>
    public const ulong ViewAlignment = 2UL << 20;

    private nint Map()
    {
        // Reserve Size + 2 MiB of address space, map the memfd over its first 2 MiB boundary, and
        // give back the slack on both sides.
        var reserve = (nuint)(Size + ViewAlignment);
        var r = Native.Mmap(0, reserve, Native.PROT_NONE, Native.MAP_PRIVATE | Native.MAP_ANONYMOUS | Native.MAP_NORESERVE, -1, 0);
        if (r == Native.MAP_FAILED) throw KvmException.Last($"mmap(reserve 0x{(ulong)reserve:X} for {Name})");
        var aligned = (nint)(((ulong)r + ViewAlignment - 1) & ~(ViewAlignment - 1));
        var p = Native.Mmap(aligned, (nuint)Size, Native.PROT_READ | Native.PROT_WRITE,
            Native.MAP_SHARED | Native.MAP_NORESERVE | Native.MAP_FIXED, _fd, 0);
        if (p == Native.MAP_FAILED)
        {
            var e = KvmException.Last($"mmap({Name}, 0x{Size:X})");
            Native.Munmap(r, reserve);
            throw e;
        }
        if (aligned > r) Native.Munmap(r, (nuint)(aligned - r));
        var tail = aligned + (nint)Size;
        var reserveEnd = r + (nint)reserve;
        if (reserveEnd > tail) Native.Munmap(tail, (nuint)(reserveEnd - tail));
        return p;
    }

    /// <summary>Both views were advised MADV_HUGEPAGE (see <see cref="AdviseHugePages"/>).</summary>
    public bool HugePagesAdvised { get; private set; }

    /// <summary>
    /// madvise(MADV_HUGEPAGE) on both views: where the host's shmem THP setting allows it
    /// (<see cref="ShmemHugePages"/>), touches allocate 2 MiB pages. Advice only — with
    /// shmem_enabled = never it succeeds and changes nothing. A userfaultfd-registered view gets
    /// none anyway: shmem raises a MISSING fault before it would allocate a huge page, and
    /// UFFDIO_COPY/ZEROPAGE/CONTINUE fill and map 4 KiB pages.
    /// </summary>
    public void AdviseHugePages()
    {
        foreach (var (view, what) in new[] { (GuestView, "guest"), (HostView, "host") })
            if (NativeMemory.Madvise(view, (nuint)Size, NativeMemory.MADV_HUGEPAGE) != 0)
                throw KvmException.Last($"madvise({Name} {what} view, MADV_HUGEPAGE)");
        HugePagesAdvised = true;
    }

    /// <summary>Bytes the host has allocated for this memfd (st_blocks × 512): touched pages only.</summary>
    public ulong AllocatedBytes
    {
        get
        {
            // SAFETY: stat is StatSize bytes, the kernel's struct stat, alive for the call; st_blocks
            // is read at its offset inside it.
            var stat = stackalloc byte[Native.StatSize];
            if (_fd < 0 || Native.Fstat(_fd, stat) != 0) return 0;
            return *(ulong*)(stat + Native.StatBlocksOffset) * 512;
        }
    }

    /// <summary>Faults in and locks the guest view into RAM (mlock): see <see cref="GuestMemoryMap.Wire"/>.
    /// The host view maps the same memfd pages, so they are pinned for it too.</summary>
    public void Lock() => MemoryLock.Lock(GuestView, Size, $"guest memory {Name}");

    /// <summary>The host view as a span (for bulk copies by loaders and devices).</summary>
    public Span<byte> HostSpan(ulong offset, int length)
    {
        if (offset + (ulong)length > Size) throw new ArgumentOutOfRangeException(nameof(offset));
        // SAFETY: bounds checked above against the mapping's size; the mapping lives until Dispose.
        return new Span<byte>((byte*)HostView + offset, length);
    }

    /// <summary>The host view as a <see cref="Memory{T}"/> (for vectored I/O straight into guest memory),
    /// valid until <see cref="Dispose"/>.</summary>
    public Memory<byte> HostMemory(ulong offset, int length)
    {
        if (length < 0 || offset + (ulong)length > Size) throw new ArgumentOutOfRangeException(nameof(offset));
        return new MappedMemory((byte*)HostView + offset, length).Memory;
    }

    /// <summary>A piece of a mapping as a <see cref="MemoryManager{T}"/>: the mapping is never moved, so
    /// pinning is a no-op, and it is unmapped by its <see cref="MemfdRegion"/>, not here.</summary>
    private sealed class MappedMemory(byte* start, int length) : System.Buffers.MemoryManager<byte>
    {
        public override Span<byte> GetSpan() => new(start, length);

        public override System.Buffers.MemoryHandle Pin(int elementIndex = 0)
        {
            if ((uint)elementIndex > (uint)length) throw new ArgumentOutOfRangeException(nameof(elementIndex));
            return new System.Buffers.MemoryHandle(start + elementIndex);
        }

        public override void Unpin() { }

        protected override void Dispose(bool disposing) { }
    }

    public void Dispose()
    {
        if (GuestView != 0) Native.Munmap(GuestView, (nuint)Size);
        if (HostView != 0) Native.Munmap(HostView, (nuint)Size);
        GuestView = HostView = 0;
        if (_fd > 0) Native.Close(_fd);
        _fd = -1;
    }
}

/// <summary>One range of guest-physical space backed by (part of) a <see cref="MemfdRegion"/>.</summary>
public sealed record GuestSegment(string Name, GuestPhysAddr Base, ulong Size, MemfdRegion Backing, ulong BackingOffset, bool ReadOnly)
{
    public GuestPhysAddr End => Base + Size;
    public bool Contains(GuestPhysAddr a) => a.Value >= Base.Value && a.Value - Base.Value < Size;
}

/// <summary>
/// The guest-physical memory map: non-overlapping segments (RAM, firmware, aliases), each a KVM
/// memslot. Reads and writes go through the host view and are bounds checked.
/// </summary>
public sealed unsafe class GuestMemoryMap : IGuestMemory, IDisposable
{
    private readonly List<GuestSegment> _segments = [];
    private readonly List<MemfdRegion> _owned = [];

    public IReadOnlyList<GuestSegment> Segments => _segments;

    /// <summary>Adds a segment; the map disposes <paramref name="backing"/> if <paramref name="owns"/>.</summary>
    public GuestSegment Add(string name, GuestPhysAddr @base, ulong size, MemfdRegion backing, ulong backingOffset = 0,
        bool readOnly = false, bool owns = true)
    {
        if (size == 0 || size % 4096 != 0 || @base.Value % 4096 != 0)
            throw new GuestMemoryException($"segment {name} at {@base} size 0x{size:X} is not 4 KiB aligned");
        if (backingOffset + size > backing.Size)
            throw new GuestMemoryException($"segment {name} exceeds its backing {backing.Name}");
        if (@base.Value + size < @base.Value)
            throw new GuestMemoryException($"segment {name} at {@base} size 0x{size:X} wraps");
        foreach (var s in _segments)
            if (@base.Value < s.End.Value && s.Base.Value < @base.Value + size)
                throw new GuestMemoryException($"segment {name} at {@base} overlaps {s.Name} at {s.Base}");
        var segment = new GuestSegment(name, @base, size, backing, backingOffset, readOnly);
        _segments.Add(segment);
        _segments.Sort((a, b) => a.Base.CompareTo(b.Base));
        if (owns && !_owned.Contains(backing)) _owned.Add(backing);
        return segment;
    }

    public IReadOnlyList<GuestRange> Ranges => _segments.Select(s => new GuestRange(s.Base, s.Size, s.ReadOnly)).ToArray();

    public GuestSegment? Find(GuestPhysAddr address)
    {
        foreach (var s in _segments)
            if (s.Contains(address)) return s;
        return null;
    }

    public bool IsMapped(GuestPhysAddr address, ulong length)
    {
        var a = address.Value;
        var end = a + length;
        if (end < a) return false;
        while (a < end)
        {
            var s = Find(new GuestPhysAddr(a));
            if (s is null) return false;
            a = s.End.Value;
        }
        return true;
    }

    public Memory<byte> HostMemory(GuestPhysAddr address, int length)
    {
        if (length <= 0 || Find(address) is not { } s) return default;
        var offset = address.Value - s.Base.Value;
        return (ulong)length <= s.Size - offset ? s.Backing.HostMemory(s.BackingOffset + offset, length) : default;
    }

    public bool TryRead(GuestPhysAddr address, Span<byte> destination)
    {
        if (!IsMapped(address, (ulong)destination.Length)) return false;
        var a = address.Value;
        var done = 0;
        while (done < destination.Length)
        {
            var s = Find(new GuestPhysAddr(a))!;
            var offset = a - s.Base.Value;
            var n = (int)Math.Min((ulong)(destination.Length - done), s.Size - offset);
            s.Backing.HostSpan(s.BackingOffset + offset, n).CopyTo(destination.Slice(done, n));
            done += n;
            a += (ulong)n;
        }
        return true;
    }

    public bool TryWrite(GuestPhysAddr address, ReadOnlySpan<byte> source)
    {
        if (!IsMapped(address, (ulong)source.Length)) return false;
        var a = address.Value;
        var done = 0;
        while (done < source.Length)
        {
            var s = Find(new GuestPhysAddr(a))!;
            var offset = a - s.Base.Value;
            var n = (int)Math.Min((ulong)(source.Length - done), s.Size - offset);
            source.Slice(done, n).CopyTo(s.Backing.HostSpan(s.BackingOffset + offset, n));
            done += n;
            a += (ulong)n;
        }
        Written(address, (ulong)source.Length);
        return true;
    }

    // One bitmap per segment (bit i: page i of the segment), null while host writes are not logged.
    private volatile ulong[][]? _hostWrites;

    /// <summary>
    /// Starts (or stops) logging the pages of writable segments the host writes: every
    /// <see cref="TryWrite"/>, and every write a device reports with <see cref="Written"/>. KVM's dirty
    /// log sees only the guest's writes; with this log the two together see all writes to RAM. Any thread.
    /// </summary>
    public void LogHostWrites(bool on) =>
        _hostWrites = on ? _segments.Select(s => new ulong[s.ReadOnly ? 0 : (s.Size / 4096 + 63) / 64]).ToArray() : null;

    public void Written(GuestPhysAddr address, ulong length)
    {
        if (_hostWrites is not { } log || length == 0) return;
        var a = address.Value & ~4095UL;
        var end = address.Value + length;
        while (a < end && Find(new GuestPhysAddr(a)) is { ReadOnly: false } s)
        {
            var bits = log[_segments.IndexOf(s)];
            var stop = Math.Min(end, s.End.Value);
            for (; a < stop; a += 4096)
            {
                var page = (a - s.Base.Value) / 4096;
                Interlocked.Or(ref bits[page / 64], 1UL << (int)(page % 64));
            }
        }
    }

    /// <summary>The pages of segment <paramref name="segment"/> (its index in map order) the host wrote
    /// since the last call, as a bitmap (bit i: page i), and forgets them; all clear while not logging.</summary>
    public ulong[] TakeHostWrites(int segment)
    {
        var s = _segments[segment];
        var taken = new ulong[(s.Size / 4096 + 63) / 64];
        if (_hostWrites is not { } log || log[segment].Length == 0) return taken;
        for (var i = 0; i < taken.Length; i++) taken[i] = Interlocked.Exchange(ref log[segment][i], 0);
        return taken;
    }

    /// <summary>
    /// Turns KVM's dirty logging of the writable memslots (numbered as <see cref="RegisterWith"/> does)
    /// on or off while the VM runs: KVM_SET_USER_MEMORY_REGION with only KVM_MEM_LOG_DIRTY_PAGES
    /// changed, which KVM allows on a live slot (api.rst, 4.35: "flags can be changed"). Turned on
    /// without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's INITIALLY_SET, every page starts clean and
    /// write-protected; <see cref="VmHandle.GetDirtyLog"/> then returns and re-arms a slot's log at once.
    /// </summary>
    public void SetDirtyLogging(VmHandle vm, bool on)
    {
        for (var i = 0; i < _segments.Count; i++)
        {
            var s = _segments[i];
            if (s.ReadOnly) continue;
            vm.SetUserMemoryRegion((uint)i, s.Base, s.Size, s.Backing.GuestView + (nint)s.BackingOffset, s.ReadOnly, on);
        }
    }

    /// <summary>The memslot <see cref="RegisterWith"/> gives <paramref name="segment"/>: its index in map order.</summary>
    public uint SlotOf(GuestSegment segment)
    {
        var i = _segments.IndexOf(segment);
        if (i < 0) throw new GuestMemoryException($"segment {segment.Name} is not in this map");
        return (uint)i;
    }

    /// <summary>Bytes <see cref="Wire"/> locked (0: not wired).</summary>
    public ulong LockedBytes { get; private set; }

    /// <summary>
    /// Wires guest memory, as the seed wires a VM with a PCI passthru device: every backing is faulted
    /// in and locked into RAM (mlock of its guest view), so no guest page is ever missing, paged out
    /// or swapped. Checks RLIMIT_MEMLOCK (and CAP_IPC_LOCK) first; throws
    /// <see cref="HostMemoryException"/> saying what to change. Returns the bytes locked.
    /// </summary>
    public ulong Wire()
    {
        var backings = _segments.Select(s => s.Backing).Distinct().ToList();
        var total = backings.Aggregate(0UL, (a, b) => a + b.Size);
        if (MemoryLock.Current().Refusal(total) is { } why) throw new HostMemoryException(why);
        foreach (var b in backings) b.Lock();
        LockedBytes = total;
        return total;
    }

    /// <summary>Registers every segment with KVM as a memslot (slot numbers in map order).</summary>
    /// <param name="logDirty">KVM logs guest writes to the writable slots (<see cref="VmHandle.GetDirtyLog"/>)</param>
    /// <param name="vm">the VM whose memslots these become</param>
    public void RegisterWith(VmHandle vm, bool logDirty = false)
    {
        for (var i = 0; i < _segments.Count; i++)
        {
            var s = _segments[i];
            vm.SetUserMemoryRegion((uint)i, s.Base, s.Size, s.Backing.GuestView + (nint)s.BackingOffset, s.ReadOnly,
                logDirty && !s.ReadOnly);
        }
    }

    public void Dispose()
    {
        foreach (var r in _owned) r.Dispose();
        _owned.Clear();
        _segments.Clear();
    }
}
