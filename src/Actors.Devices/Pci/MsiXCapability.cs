namespace ActorVmm.Devices.Pci;

/// <summary>
/// The MSI-X capability (ID 11h, PCI Local Bus 3.0 §6.8.2), 12 bytes:
/// <code>
/// +0x00 ID, next   +0x02 Message Control   +0x04 Table Offset | Table BIR   +0x08 PBA Offset | PBA BIR
/// </code>
/// Message Control (§6.8.2.3): bits 10:0 table size - 1 read-only, bit 14 Function Mask and bit 15
/// MSI-X Enable writable. The offsets (8-byte aligned) and BIRs (which BAR, bits 2:0) are read-only.
/// The table and the PBA themselves (<see cref="Table"/>) live in the function's memory BARs: the
/// device's BAR model passes accesses there through <see cref="TryReadBar"/> / <see cref="TryWriteBar"/>.
///
/// A vector is masked while Function Mask or its entry's Mask bit is set. <see cref="Signal"/> of a
/// masked vector sets its pending bit (§6.8.2.10 / §6.8.2.11); once it is unmasked (either bit
/// cleared) the pending message is sent and the bit cleared. Nothing is sent, and nothing becomes
/// pending, while MSI-X is disabled or bus mastering is off (Command bit 2, §6.2.2).
/// </summary>
public sealed class MsiXCapability
{
    public const byte CapabilityId = 0x11;
    public const int MaxVectors = 2048;
    public const ushort ControlEnable = 0b1000_0000_0000_0000;
    public const ushort ControlFunctionMask = 0b0100_0000_0000_0000;
    private const uint BirMask = 0b111;

    private readonly PciConfigSpace _config;

    /// <param name="config">the function's configuration space, its BARs added already</param>
    /// <param name="vectors">the table size, 1-2048</param>
    /// <param name="tableBar">the memory BAR holding the table</param>
    /// <param name="tableOffset">the table's offset in that BAR, 8-byte aligned</param>
    /// <param name="pbaBar">the memory BAR holding the PBA (may be the table's; they must not overlap)</param>
    /// <param name="pbaOffset">the PBA's offset in that BAR, 8-byte aligned</param>
    /// <param name="deliver">sends a message (to the local APICs); called from Signal and from config/table writes</param>
    public MsiXCapability(PciConfigSpace config, int vectors, int tableBar, uint tableOffset, int pbaBar, uint pbaOffset,
        Action<MsiMessage> deliver)
    {
        if (vectors is < 1 or > MaxVectors) throw new ArgumentOutOfRangeException(nameof(vectors), "1-2048");
        _config = config;
        Table = new MsiXTable(vectors, deliver, IsMaskedByFunction);
        CheckPlacement(config, tableBar, tableOffset, (ulong)MsiXTable.EntrySize * (ulong)vectors, "table");
        CheckPlacement(config, pbaBar, pbaOffset, (ulong)Table.PbaLength, "PBA");
        if (tableBar == pbaBar && tableOffset < pbaOffset + (ulong)Table.PbaLength && pbaOffset < tableOffset + (ulong)Table.TableLength)
            throw new ArgumentException("the MSI-X table and PBA overlap");
        TableBar = tableBar;
        TableOffset = tableOffset;
        PbaBar = pbaBar;
        PbaOffset = pbaOffset;

        Offset = config.AddCapability(CapabilityId, 12);
        config.DefineRegister(ControlOffset, 2, (uint)(vectors - 1), ControlEnable | ControlFunctionMask);
        config.DefineRegister(Offset + 4, 4, tableOffset | (uint)tableBar, 0);
        config.DefineRegister(Offset + 8, 4, pbaOffset | (uint)pbaBar, 0);
        config.AddIntxSuppressor(() => Enabled);
        config.Written += (offset, length) =>
        {
            if (offset < ControlOffset + 2 && offset + length > ControlOffset) Table.SendUnmaskedPending();
        };
    }

    public MsiXTable Table { get; }

    /// <summary>The capability's offset in configuration space.</summary>
    public int Offset { get; }

    public int TableBar { get; }
    public uint TableOffset { get; }
    public int PbaBar { get; }
    public uint PbaOffset { get; }

    private int ControlOffset => Offset + 2;

    private ushort Control => (ushort)_config.Get(ControlOffset, 2);

    public bool Enabled => (Control & ControlEnable) != 0;

    public bool FunctionMasked => (Control & ControlFunctionMask) != 0;

    /// <summary>The device's interrupt for <paramref name="vector"/>: true if a message was sent,
    /// false if it is now pending (masked) or dropped (MSI-X off, bus mastering off, no such vector).</summary>
    public bool Signal(int vector) => Table.Signal(vector);

    /// <summary>A read of <paramref name="size"/> bytes at <paramref name="offset"/> in BAR
    /// <paramref name="bar"/>: true, with the value, if it falls in the table or the PBA.</summary>
    public bool TryReadBar(int bar, ulong offset, int size, out ulong value)
    {
        value = 0;
        if (bar == TableBar && offset - TableOffset < (ulong)Table.TableLength)
        {
            value = Table.ReadTable(offset - TableOffset, size);
            return true;
        }
        if (bar == PbaBar && offset - PbaOffset < (ulong)Table.PbaLength)
        {
            value = Table.ReadPba(offset - PbaOffset, size);
            return true;
        }
        return false;
    }

    /// <summary>A write into BAR <paramref name="bar"/>: true if it falls in the table or the PBA (and was handled there).</summary>
    public bool TryWriteBar(int bar, ulong offset, int size, ulong value)
    {
        if (bar == TableBar && offset - TableOffset < (ulong)Table.TableLength)
        {
            Table.WriteTable(offset - TableOffset, size, value);
            return true;
        }
        return bar == PbaBar && offset - PbaOffset < (ulong)Table.PbaLength; // the PBA is read-only
    }

    private bool IsMaskedByFunction(out bool deliverable)
    {
        deliverable = Enabled && _config.BusMasterEnabled;
        return FunctionMasked;
    }

    private static void CheckPlacement(PciConfigSpace config, int bar, uint offset, ulong length, string what)
    {
        if (config.Bar(bar) is not { Kind: not PciBarKind.Io } b || b.Index != bar)
            throw new ArgumentException($"the MSI-X {what} needs memory BAR {bar}");
        if ((offset & BirMask) != 0 || offset + length > b.Size)
            throw new ArgumentException($"the MSI-X {what} at 0x{offset:X} (+0x{length:X}) is unaligned or outside BAR {bar}");
    }
}

/// <summary>
/// The MSI-X table and Pending Bit Array of a function (PCI Local Bus 3.0 §6.8.2.6-§6.8.2.10).
/// Table entry n is 16 bytes at n * 16: Message Address (bits 1:0 read 0), Message Upper Address,
/// Message Data, Vector Control (bit 0 Mask, set at reset; the other bits reserved, read 0).
/// The PBA is one bit per vector in qwords, read-only.
///
/// §6.8.2 allows software only aligned dword or qword accesses; anything else is undefined, and
/// here: a read of 1, 2, 4 or 8 bytes returns the bytes at that offset (bytes past the end read
/// 0xFF), a write that is not an aligned dword or qword is ignored, and writes to the PBA are ignored.
/// </summary>
public sealed class MsiXTable
{
    public const int EntrySize = 16;
    public const uint VectorControlMask = 0b1;

    /// <summary>Whether the function masks every vector, and whether it can send at all (enabled and bus master).</summary>
    internal delegate bool FunctionState(out bool deliverable);

    private readonly uint[] _entries; // 4 dwords per vector
    private readonly ulong[] _pending;
    private readonly Action<MsiMessage> _deliver;
    private readonly FunctionState _function;

    internal MsiXTable(int vectors, Action<MsiMessage> deliver, FunctionState function)
    {
        Vectors = vectors;
        _deliver = deliver;
        _function = function;
        _entries = new uint[vectors * 4];
        _pending = new ulong[(vectors + 63) / 64];
        for (var v = 0; v < vectors; v++) _entries[v * 4 + 3] = VectorControlMask;
    }

    public int Vectors { get; }

    public int TableLength => Vectors * EntrySize;

    public int PbaLength => _pending.Length * 8;

    public bool IsMasked(int vector) => (_entries[vector * 4 + 3] & VectorControlMask) != 0;

    public bool IsPending(int vector) => (_pending[vector >> 6] & (1UL << (vector & 63))) != 0;

    public MsiMessage Message(int vector) =>
        new((ulong)_entries[vector * 4 + 1] << 32 | _entries[vector * 4], _entries[vector * 4 + 2]);

    public ulong ReadTable(ulong offset, int size) =>
        ReadBytes(offset, size, (ulong)TableLength, i => _entries[i >> 2] >> (8 * (int)(i & 3)));

    public ulong ReadPba(ulong offset, int size) =>
        ReadBytes(offset, size, (ulong)PbaLength, i => (uint)(_pending[i >> 3] >> (8 * (int)(i & 7))));

    public void WriteTable(ulong offset, int size, ulong value)
    {
        if (!(size == 4 && offset % 4 == 0 || size == 8 && offset % 8 == 0) || offset + (ulong)size > (ulong)TableLength) return;
        for (var d = 0; d < size / 4; d++)
        {
            var index = (int)(offset / 4) + d;
            var dword = (uint)(value >> (32 * d));
            _entries[index] = (index & 3) switch
            {
                0 => dword & ~0b11u,
                3 => dword & VectorControlMask,
                _ => dword,
            };
        }
        var vector = (int)(offset / EntrySize);
        if (!IsMasked(vector) && IsPending(vector)) SendIfReady(vector);
    }

    internal bool Signal(int vector)
    {
        if (vector < 0 || vector >= Vectors) return false;
        var functionMasked = _function(out var deliverable);
        if (!deliverable) return false;
        if (functionMasked || IsMasked(vector))
        {
            _pending[vector >> 6] |= 1UL << (vector & 63);
            return false;
        }
        _deliver(Message(vector));
        return true;
    }

    internal void SendUnmaskedPending()
    {
        for (var w = 0; w < _pending.Length; w++)
        {
            var word = _pending[w];
            while (word != 0)
            {
                var v = w * 64 + System.Numerics.BitOperations.TrailingZeroCount(word);
                word &= word - 1;
                if (!IsMasked(v)) SendIfReady(v);
            }
        }
    }

    private void SendIfReady(int vector)
    {
        if (_function(out var deliverable) || !deliverable) return;
        _pending[vector >> 6] &= ~(1UL << (vector & 63));
        _deliver(Message(vector));
    }

    public MsiXTableSnapshot State() => new([.. _entries], [.. _pending]);

    public void Restore(MsiXTableSnapshot state)
    {
        state.Entries.AsSpan(0, Math.Min(state.Entries.Length, _entries.Length)).CopyTo(_entries);
        state.Pending.AsSpan(0, Math.Min(state.Pending.Length, _pending.Length)).CopyTo(_pending);
    }

    private static ulong ReadBytes(ulong offset, int size, ulong length, Func<ulong, uint> byteAt)
    {
        if (!AccessSize.IsValid(size)) return ulong.MaxValue;
        ulong value = 0;
        for (var i = 0; i < size; i++)
        {
            var at = offset + (ulong)i;
            var b = at < length && at >= offset ? byteAt(at) & 0xFF : 0xFF;
            value |= (ulong)b << (8 * i);
        }
        return value;
    }
}

/// <summary>The MSI-X table entries (4 dwords each) and PBA qwords, for a restart.</summary>
public sealed record MsiXTableSnapshot(uint[] Entries, ulong[] Pending);
