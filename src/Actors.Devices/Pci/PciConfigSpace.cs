namespace ActorVmm.Devices.Pci;

/// <summary>The identity of a PCI function as its type-0 header states it (PCI Local Bus 3.0
/// §6.2.1): vendor and device ID, the 24-bit class code as base class / sub-class / programming
/// interface, revision, and the subsystem IDs (§6.2.4).</summary>
public readonly record struct PciIds(
    ushort VendorId,
    ushort DeviceId,
    byte BaseClass,
    byte SubClass,
    byte ProgIf = 0,
    byte Revision = 0,
    ushort SubsystemVendorId = 0,
    ushort SubsystemId = 0);

/// <summary>The value of the Interrupt Pin register (PCI Local Bus 3.0 §6.2.4): 0 for none, 1-4 for INTA#-INTD#.</summary>
public enum PciInterruptPin : byte
{
    None = 0,
    IntA = 1,
    IntB = 2,
    IntC = 3,
    IntD = 4,
}

/// <summary>What a base address register decodes (PCI Local Bus 3.0 §6.2.5.1).</summary>
public enum PciBarKind
{
    Io,
    Memory32,
    Memory64,
}

/// <summary>One implemented BAR: its index (0-5; a 64-bit BAR also takes index + 1), what it
/// decodes, its size (a power of two) and the prefetchable bit of a memory BAR.</summary>
public sealed record PciBar(int Index, PciBarKind Kind, ulong Size, bool Prefetchable);

/// <summary>The bytes of a function's configuration space as the guest left them, and its INTx
/// level: what a restart needs besides the device's own construction (which defines the masks,
/// BARs and capabilities again).</summary>
public sealed record PciConfigSpaceSnapshot(byte[] Bytes, bool IntxLevel);

/// <summary>
/// The configuration space of one type-0 PCI function (PCI Local Bus 3.0 §6.1-§6.2): 256 bytes for
/// a conventional function, 4 KiB for one reached through ECAM with extended space (PCIe Base 4.0
/// §7.2.2). Every byte has a write mask (bits software may change) and a write-1-to-clear mask;
/// the rest is read-only. The header:
/// <list type="bullet">
/// <item>0x00 vendor ID, 0x02 device ID, 0x08 revision, 0x09-0x0B class code, 0x2C/0x2E subsystem
/// vendor/ID, 0x0E header type 0 (bit 7 set by the bus when the device has more functions): read-only.</item>
/// <item>0x04 Command (§6.2.2): I/O space (bit 0), memory space (1), bus master (2), parity error
/// response (6), SERR# enable (8), interrupt disable (10) are writable; the others are hardwired 0.</item>
/// <item>0x06 Status (§6.2.3): interrupt status (bit 3) and capabilities list (bit 4) read-only;
/// master data parity error, signaled/received target abort, received master abort, signaled system
/// error and detected parity error (bits 8, 11-15) write-1-to-clear.</item>
/// <item>0x0C cache line size read/write; latency timer, BIST, CardBus CIS, expansion ROM (no ROM:
/// the register sizes as 0, §6.2.5.2), Min_Gnt, Max_Lat read 0 (PCIe Base 4.0 §7.5.1.1 hardwires
/// the latency timer to 0 too).</item>
/// <item>0x10-0x24 BARs (§6.2.5.1): address bits at and above the size writable, the rest (the
/// type bits and the bits below the size) read-only, so writing all ones reads back the size mask.</item>
/// <item>0x34 capabilities pointer, built by <see cref="AddCapability"/> (§6.7) from 0x40 upwards.</item>
/// <item>0x3C interrupt line read/write, 0x3D interrupt pin read-only.</item>
/// </list>
/// Accesses are byte-wise: any size of 1-4 bytes at any offset, bytes past the end of the space
/// read 0xFF and ignore writes (what a read of an absent register returns, §6.1); extended space of
/// a function with <c>extended: true</c> reads 0 (PCIe Base 4.0 §7.6.3: a zero header ends the
/// empty extended capability list). A write is reported to <see cref="Written"/> after it applies,
/// so capabilities can act on it.
/// </summary>
public sealed class PciConfigSpace
{
    public const int ConventionalSize = 256;
    public const int ExtendedSize = 4096;

    public const int VendorIdOffset = 0x00;
    public const int DeviceIdOffset = 0x02;
    public const int CommandOffset = 0x04;
    public const int StatusOffset = 0x06;
    public const int RevisionOffset = 0x08;
    public const int ClassCodeOffset = 0x09;
    public const int CacheLineSizeOffset = 0x0C;
    public const int HeaderTypeOffset = 0x0E;
    public const int Bar0Offset = 0x10;
    public const int SubsystemVendorIdOffset = 0x2C;
    public const int SubsystemIdOffset = 0x2E;
    public const int CapabilitiesPointerOffset = 0x34;
    public const int InterruptLineOffset = 0x3C;
    public const int InterruptPinOffset = 0x3D;
    public const int FirstCapabilityOffset = 0x40;
    public const int BarCount = 6;

    public const ushort CommandIoSpace = 0b0000_0000_0001;
    public const ushort CommandMemorySpace = 0b0000_0000_0010;
    public const ushort CommandBusMaster = 0b0000_0000_0100;
    public const ushort CommandParityErrorResponse = 0b0000_0100_0000;
    public const ushort CommandSerrEnable = 0b0001_0000_0000;
    public const ushort CommandInterruptDisable = 0b0100_0000_0000;
    private const ushort CommandWritable = CommandIoSpace | CommandMemorySpace | CommandBusMaster
        | CommandParityErrorResponse | CommandSerrEnable | CommandInterruptDisable;

    public const ushort StatusInterrupt = 0b0000_0000_0000_1000;
    public const ushort StatusCapabilitiesList = 0b0000_0000_0001_0000;
    /// <summary>Master data parity error, signaled target abort, received target abort, received
    /// master abort, signaled system error, detected parity error (§6.2.3): write 1 to clear.</summary>
    public const ushort StatusWriteOneToClear = 0b1111_1001_0000_0000;

    public const byte HeaderTypeMultiFunction = 0b1000_0000;

    private const uint IoBarTypeBits = 0b01;          // bit 0: I/O space indicator
    private const uint MemoryBar64Type = 0b100;      // bits 2:1 = 10b: 64-bit
    private const uint MemoryBarPrefetchable = 0b1000;

    private readonly byte[] _bytes = new byte[ExtendedSize];
    private readonly byte[] _writeMask = new byte[ExtendedSize];
    private readonly byte[] _w1cMask = new byte[ExtendedSize];
    private readonly PciBar?[] _bars = new PciBar?[BarCount];
    private readonly List<Func<bool>> _intxSuppressors = [];
    private int _nextCapability = FirstCapabilityOffset;
    private int _lastCapability; // 0: none yet
    private IInterruptLine _intx = NullInterruptLine.Instance;
    private bool _intxLevel;
    private bool _intxOut;

    public PciConfigSpace(PciIds ids, PciInterruptPin pin = PciInterruptPin.None, bool extended = false)
    {
        Ids = ids;
        Pin = pin;
        Size = extended ? ExtendedSize : ConventionalSize;
        Set16(VendorIdOffset, ids.VendorId);
        Set16(DeviceIdOffset, ids.DeviceId);
        _bytes[RevisionOffset] = ids.Revision;
        _bytes[ClassCodeOffset] = ids.ProgIf;
        _bytes[ClassCodeOffset + 1] = ids.SubClass;
        _bytes[ClassCodeOffset + 2] = ids.BaseClass;
        Set16(SubsystemVendorIdOffset, ids.SubsystemVendorId);
        Set16(SubsystemIdOffset, ids.SubsystemId);
        _bytes[InterruptPinOffset] = (byte)pin;
        DefineRegister(CommandOffset, 2, 0, CommandWritable);
        DefineRegister(StatusOffset, 2, 0, 0, StatusWriteOneToClear);
        DefineRegister(CacheLineSizeOffset, 1, 0, 0xFF);
        DefineRegister(InterruptLineOffset, 1, 0xFF, 0xFF); // 0xFF: "unknown / not connected" until firmware writes it
    }

    public PciIds Ids { get; }

    public PciInterruptPin Pin { get; }

    /// <summary>256 or 4096: bytes at and past this offset are absent.</summary>
    public int Size { get; }

    /// <summary>Raised after every write with its (clamped) offset and length, after the masks applied.</summary>
    public event Action<int, int>? Written;

    public ushort Command => (ushort)Get(CommandOffset, 2);

    public ushort Status => (ushort)Get(StatusOffset, 2);

    public bool BusMasterEnabled => (Command & CommandBusMaster) != 0;

    public byte InterruptLine => _bytes[InterruptLineOffset];

    public IReadOnlyList<PciBar> Bars => [.. _bars.OfType<PciBar>().Distinct()];

    /// <summary>The BAR whose register is at <paramref name="index"/> (the upper half of a 64-bit
    /// BAR gives that BAR), or null if none is implemented there.</summary>
    public PciBar? Bar(int index) => index is >= 0 and < BarCount ? _bars[index] : null;

    // ---- Guest (configuration transaction) side ----

    /// <summary>A configuration read of 1-4 bytes (any other size reads all ones, bytes past the end read 0xFF).</summary>
    public uint Read(int offset, int size)
    {
        if (size is < 1 or > 4 || offset < 0) return (uint)AccessSize.AllOnes(Math.Clamp(size, 0, 4));
        uint value = 0;
        for (var i = 0; i < size; i++)
        {
            var at = offset + i;
            value |= (uint)((uint)at < (uint)Size ? _bytes[at] : 0xFF) << (8 * i); // unsigned: an offset that wraps is absent too
        }
        return value;
    }

    /// <summary>A configuration write of 1-4 bytes through the write and W1C masks (other sizes ignored).</summary>
    public void Write(int offset, int size, uint value)
    {
        if (size is < 1 or > 4 || offset < 0 || offset >= Size) return;
        var length = Math.Min(size, Size - offset);
        for (var i = 0; i < length; i++)
        {
            var at = offset + i;
            var v = (byte)(value >> (8 * i));
            _bytes[at] = (byte)(((_bytes[at] & ~_writeMask[at]) | (v & _writeMask[at])) & ~(v & _w1cMask[at]));
        }
        UpdateIntx();
        Written?.Invoke(offset, length);
    }

    // ---- Device (model) side ----

    /// <summary>Defines a register of 1-4 bytes: its value at reset, the bits software may write and
    /// the bits it clears by writing 1. For device-specific registers and capabilities.</summary>
    public void DefineRegister(int offset, int size, uint initial, uint writeMask, uint w1cMask = 0)
    {
        CheckRange(offset, size);
        for (var i = 0; i < size; i++)
        {
            _bytes[offset + i] = (byte)(initial >> (8 * i));
            _writeMask[offset + i] = (byte)(writeMask >> (8 * i));
            _w1cMask[offset + i] = (byte)((w1cMask & ~writeMask) >> (8 * i));
        }
    }

    /// <summary>The current value of 1-4 bytes, as the device sees them (no masks).</summary>
    public uint Get(int offset, int size)
    {
        uint value = 0;
        for (var i = 0; i < size; i++) value |= (uint)_bytes[offset + i] << (8 * i);
        return value;
    }

    /// <summary>Sets 1-4 bytes regardless of the masks: the device changing its read-only bits
    /// (a pending bit, a status bit).</summary>
    public void Set(int offset, int size, uint value)
    {
        for (var i = 0; i < size; i++) _bytes[offset + i] = (byte)(value >> (8 * i));
    }

    /// <summary>
    /// Adds a capability (PCI Local Bus 3.0 §6.7) of <paramref name="length"/> bytes with ID
    /// <paramref name="id"/> at the next free dword-aligned offset from 0x40, links it at the end of
    /// the list (the capabilities pointer for the first, the previous one's next pointer otherwise),
    /// sets Status bit 4, and returns its offset. The two header bytes are read-only; the caller
    /// defines the rest with <see cref="DefineRegister"/>. Throws if the header space is full (a
    /// construction error, never a guest's).
    /// </summary>
    public int AddCapability(byte id, int length)
    {
        if (length < 2) throw new ArgumentOutOfRangeException(nameof(length), "a capability has at least its 2 header bytes");
        var at = _nextCapability;
        if (at + length > ConventionalSize) throw new InvalidOperationException($"no room for a {length}-byte capability at 0x{at:X}");
        _bytes[at] = id;
        _bytes[at + 1] = 0;
        if (_lastCapability == 0) _bytes[CapabilitiesPointerOffset] = (byte)at;
        else _bytes[_lastCapability + 1] = (byte)at;
        _lastCapability = at;
        _nextCapability = (at + length + 3) & ~3;
        Set(StatusOffset, 2, (uint)(Status | StatusCapabilitiesList));
        return at;
    }

    /// <summary>A 32-bit memory BAR of <paramref name="size"/> bytes (a power of two, at least 16, §6.2.5.1) at <paramref name="index"/>.</summary>
    public PciBar AddMemoryBar32(int index, uint size, bool prefetchable = false) =>
        AddBar(new PciBar(index, PciBarKind.Memory32, size, prefetchable), 16, uint.MaxValue + 1UL);

    /// <summary>A 64-bit memory BAR (registers <paramref name="index"/> and index + 1) of <paramref name="size"/> bytes.</summary>
    public PciBar AddMemoryBar64(int index, ulong size, bool prefetchable = false) =>
        AddBar(new PciBar(index, PciBarKind.Memory64, size, prefetchable), 16, 1UL << 63);

    /// <summary>An I/O BAR of <paramref name="size"/> bytes (a power of two, 4-256: §6.2.5.1 limits an I/O BAR to 256 bytes).</summary>
    public PciBar AddIoBar(int index, uint size) => AddBar(new PciBar(index, PciBarKind.Io, size, false), 4, 256);

    private PciBar AddBar(PciBar bar, ulong min, ulong max)
    {
        var slots = bar.Kind == PciBarKind.Memory64 ? 2 : 1;
        if (bar.Index < 0 || bar.Index + slots > BarCount) throw new ArgumentOutOfRangeException(nameof(bar), $"BAR {bar.Index} does not fit");
        if (!ulong.IsPow2(bar.Size) || bar.Size < min || bar.Size > max)
            throw new ArgumentOutOfRangeException(nameof(bar), $"BAR size 0x{bar.Size:X} is not a power of two in 0x{min:X}-0x{max:X}");
        for (var i = 0; i < slots; i++)
            if (_bars[bar.Index + i] is not null) throw new InvalidOperationException($"BAR {bar.Index + i} is taken");

        var offset = Bar0Offset + 4 * bar.Index;
        var addressMask = ~(bar.Size - 1);
        switch (bar.Kind)
        {
            case PciBarKind.Io:
                DefineRegister(offset, 4, IoBarTypeBits, (uint)addressMask & ~0b11u);
                break;
            case PciBarKind.Memory32:
                DefineRegister(offset, 4, bar.Prefetchable ? MemoryBarPrefetchable : 0, (uint)addressMask & ~0b1111u);
                break;
            default:
                DefineRegister(offset, 4, MemoryBar64Type | (bar.Prefetchable ? MemoryBarPrefetchable : 0), (uint)addressMask & ~0b1111u);
                DefineRegister(offset + 4, 4, 0, (uint)(addressMask >> 32));
                break;
        }
        for (var i = 0; i < slots; i++) _bars[bar.Index + i] = bar;
        return bar;
    }

    /// <summary>
    /// The address at which BAR <paramref name="index"/> decodes now, or null when it does not: no
    /// BAR there, its space disabled in the Command register (§6.2.2 bits 0/1), or its address 0
    /// (unassigned, as firmware and OSes treat it) or placing the range past the end of its space
    /// (I/O above 0xFFFF, 32-bit memory above 4 GiB).
    /// </summary>
    public ulong? DecodedAddress(int index)
    {
        if (Bar(index) is not { } bar || bar.Index != index) return null; // the upper half of a 64-bit BAR decodes nothing itself
        var command = Command;
        var offset = Bar0Offset + 4 * bar.Index;
        ulong address;
        ulong limit;
        if (bar.Kind == PciBarKind.Io)
        {
            if ((command & CommandIoSpace) == 0) return null;
            address = Get(offset, 4) & ~0b11u;
            limit = 0x1_0000;
        }
        else
        {
            if ((command & CommandMemorySpace) == 0) return null;
            address = Get(offset, 4) & ~0b1111u;
            if (bar.Kind == PciBarKind.Memory64) address |= (ulong)Get(offset + 4, 4) << 32;
            limit = bar.Kind == PciBarKind.Memory32 ? 1UL << 32 : ulong.MaxValue;
        }
        if (address == 0 || address > limit - bar.Size) return null;
        return address;
    }

    // ---- INTx ----

    /// <summary>Connects the function's INTx# output (its routed line; see <see cref="PciInterruptRouting"/>).</summary>
    public void ConnectIntx(IInterruptLine line)
    {
        _intx = line;
        _intxOut = false;
        UpdateIntx();
    }

    /// <summary>
    /// The device's interrupt condition (level-sensitive, §2.2.6). Status bit 3 follows it; the pin
    /// is asserted while it is set, Command bit 10 (interrupt disable, §6.2.2) is clear and neither
    /// MSI nor MSI-X is enabled (§6.8.1.3, §6.8.2.3: a function with message-signalled interrupts
    /// enabled does not use INTx#). A function without an interrupt pin ignores it.
    /// </summary>
    public void SetIntx(bool level)
    {
        if (Pin == PciInterruptPin.None) return;
        _intxLevel = level;
        var status = level ? Status | StatusInterrupt : Status & ~StatusInterrupt;
        Set(StatusOffset, 2, (uint)status);
        UpdateIntx();
    }

    /// <summary>Whether INTx# is asserted now.</summary>
    public bool IntxAsserted => _intxOut;

    internal void AddIntxSuppressor(Func<bool> messageSignalledEnabled) => _intxSuppressors.Add(messageSignalledEnabled);

    private void UpdateIntx()
    {
        var suppressed = false;
        foreach (var s in _intxSuppressors) suppressed |= s();
        var level = _intxLevel && (Command & CommandInterruptDisable) == 0 && !suppressed;
        if (level == _intxOut) return;
        _intxOut = level;
        if (level) _intx.Assert();
        else _intx.Deassert();
    }

    // ---- Header type, state ----

    internal void SetMultiFunction() => _bytes[HeaderTypeOffset] |= HeaderTypeMultiFunction;

    public PciConfigSpaceSnapshot State() => new(_bytes[..Size], _intxLevel);

    /// <summary>Loads the bytes of <paramref name="state"/> into a function constructed as the saved one was.</summary>
    public void Restore(PciConfigSpaceSnapshot state)
    {
        state.Bytes.AsSpan(0, Math.Min(state.Bytes.Length, Size)).CopyTo(_bytes);
        _intxLevel = state.IntxLevel;
        _intxOut = false;
        UpdateIntx();
        Written?.Invoke(0, Size);
    }

    private void Set16(int offset, ushort value) => Set(offset, 2, value);

    private void CheckRange(int offset, int size)
    {
        if (size is < 1 or > 4 || offset < 0 || offset + size > Size)
            throw new ArgumentOutOfRangeException(nameof(offset), $"register 0x{offset:X}+{size} is outside the configuration space");
    }
}
