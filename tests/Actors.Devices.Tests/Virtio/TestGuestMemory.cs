using System.Buffers.Binary;
using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Tests.Virtio;

/// <summary>
/// Guest memory for virtio model tests: RAM at 0 (1 MiB), a read-only firmware page right after it,
/// nothing above. It counts every access that fails (outside all segments) and every write that lands
/// in the firmware page, so a test can check that a device never tried either. With
/// <see cref="HostView"/> it also hands out spans of itself (<see cref="IGuestMemory.HostMemory"/>), as a
/// VM's memory does, and counts them.
/// </summary>
internal sealed class TestGuestMemory : IGuestMemory
{
    public const ulong RamSize = 0x10_0000;
    public const ulong RomBase = RamSize;
    public const ulong RomSize = 0x1000;

    private readonly byte[] _ram = new byte[RamSize];
    private readonly byte[] _rom = new byte[RomSize];

    public int AccessesOutside { get; private set; }
    public bool HostView { get; init; }
    public int HostViewsGiven { get; private set; }
    public int RomWrites { get; private set; }

    public IReadOnlyList<GuestRange> Ranges { get; } =
    [
        new(new GuestPhysAddr(0), RamSize, false),
        new(new GuestPhysAddr(RomBase), RomSize, true),
    ];

    public bool IsMapped(GuestPhysAddr address, ulong length) =>
        address.Value + length >= address.Value && address.Value + length <= RomBase + RomSize;

    public bool TryRead(GuestPhysAddr address, Span<byte> destination)
    {
        if (!IsMapped(address, (ulong)destination.Length))
        {
            AccessesOutside++;
            return false;
        }
        for (var i = 0; i < destination.Length; i++) destination[i] = At(address.Value + (ulong)i);
        return true;
    }

    public bool TryWrite(GuestPhysAddr address, ReadOnlySpan<byte> source)
    {
        if (!IsMapped(address, (ulong)source.Length))
        {
            AccessesOutside++;
            return false;
        }
        if (address.Value + (ulong)source.Length > RomBase) RomWrites++;
        for (var i = 0; i < source.Length; i++)
        {
            var a = address.Value + (ulong)i;
            if (a < RamSize) _ram[a] = source[i];
            else _rom[a - RomBase] = source[i];
        }
        return true;
    }

    public Memory<byte> HostMemory(GuestPhysAddr address, int length)
    {
        var a = address.Value;
        if (!HostView || length <= 0 || a + (ulong)length < a) return default;
        Memory<byte> memory;
        if (a + (ulong)length <= RamSize) memory = _ram.AsMemory((int)a, length);
        else if (a >= RomBase && a + (ulong)length <= RomBase + RomSize) memory = _rom.AsMemory((int)(a - RomBase), length);
        else return default;
        HostViewsGiven++;
        return memory;
    }

    private byte At(ulong a) => a < RamSize ? _ram[a] : _rom[a - RomBase];

    public byte[] Bytes(ulong address, int length) => _ram.AsSpan((int)address, length).ToArray();

    public void Fill(ulong address, int length, byte value) => _ram.AsSpan((int)address, length).Fill(value);

    public ushort U16(ulong a) => BinaryPrimitives.ReadUInt16LittleEndian(_ram.AsSpan((int)a));
    public uint U32(ulong a) => BinaryPrimitives.ReadUInt32LittleEndian(_ram.AsSpan((int)a));
    public void SetU16(ulong a, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(_ram.AsSpan((int)a), v);
    public void SetU32(ulong a, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(_ram.AsSpan((int)a), v);
    public void SetU64(ulong a, ulong v) => BinaryPrimitives.WriteUInt64LittleEndian(_ram.AsSpan((int)a), v);
}

/// <summary>
/// The driver's side of a split virtqueue in <see cref="TestGuestMemory"/> (virtio 1.2 §2.7), laid out
/// as a driver would: descriptor table, available ring and used ring at fixed addresses, zeroed.
/// </summary>
internal sealed class DriverRing
{
    public const ulong DefaultDesc = 0x1_0000;
    public const ulong DefaultAvail = 0x2_0000;
    public const ulong DefaultUsed = 0x3_0000;

    private readonly TestGuestMemory _m;

    public ushort Size { get; }
    public ulong Desc { get; }
    public ulong Avail { get; }
    public ulong Used { get; }
    public ushort AvailIdx { get; private set; }

    public DriverRing(TestGuestMemory memory, ushort size, ulong desc = DefaultDesc, ulong avail = DefaultAvail,
        ulong used = DefaultUsed)
    {
        _m = memory;
        Size = size;
        Desc = desc;
        Avail = avail;
        Used = used;
    }

    public void SetDesc(int index, ulong addr, uint len, ushort flags = 0, ushort next = 0) => SetDescAt(Desc, index, addr, len, flags, next);

    public void SetDescAt(ulong table, int index, ulong addr, uint len, ushort flags = 0, ushort next = 0)
    {
        var d = table + 16UL * (ulong)index;
        _m.SetU64(d, addr);
        _m.SetU32(d + 8, len);
        _m.SetU16(d + 12, flags);
        _m.SetU16(d + 14, next);
    }

    /// <summary>Puts <paramref name="head"/> on the available ring and publishes it (§2.7.13).</summary>
    public void MakeAvailable(ushort head)
    {
        _m.SetU16(Avail + 4 + 2UL * (ulong)(AvailIdx % Size), head);
        AvailIdx++;
        _m.SetU16(Avail + 2, AvailIdx);
    }

    /// <summary>Sets avail.idx as a hostile driver might.</summary>
    public void SetAvailIdx(ushort idx)
    {
        AvailIdx = idx;
        _m.SetU16(Avail + 2, idx);
    }

    public ushort AvailFlags { set => _m.SetU16(Avail, value); }
    public ushort UsedEvent { set => _m.SetU16(Avail + 4 + 2UL * Size, value); }
    public ushort UsedFlags => _m.U16(Used);
    public ushort UsedIdx => _m.U16(Used + 2);
    public ushort AvailEvent => _m.U16(Used + 4 + 8UL * Size);

    public (uint Id, uint Len) UsedElem(int i)
    {
        var e = Used + 4 + 8UL * (ulong)(i % Size);
        return (_m.U32(e), _m.U32(e + 4));
    }
}
