using System.Collections.Immutable;

namespace ActorVmm.Devices;

/// <summary>Delivery mode of an interrupt message, ICR bits 10:8 and LVT bits 10:8 (SDM Vol 3A §10.6.1), and of an IOAPIC redirection entry (82093AA
/// datasheet §3.2.4).
/// 0b011 is reserved everywhere; <see cref="ExtInt"/> is reserved in the ICR.</summary>
public enum DeliveryMode : byte
{
    Fixed = 0b000,
    LowestPriority = 0b001,
    Smi = 0b010,
    Nmi = 0b100,
    Init = 0b101,
    StartUp = 0b110,
    ExtInt = 0b111,
}

/// <summary>
/// One interrupt message on the APIC bus (or its MSI equivalent). <paramref name="Destination"/>
/// is an APIC ID when <paramref name="LogicalDestination"/> is false, else a logical destination
/// (MDA) to match against each LAPIC's LDR/DFR. <paramref name="Level"/> is the assert (true) /
/// deassert level of the message, <paramref name="LevelTriggered"/> its trigger mode: a LAPIC
/// sets TMR for it and answers its EOI with a level EOI back to the IOAPIC.
/// </summary>
public sealed record ApicMessage(
    byte Vector,
    DeliveryMode Mode,
    bool LogicalDestination,
    uint Destination,
    bool Level,
    bool LevelTriggered);

/// <summary>Where an IOAPIC (or an MSI source) sends its messages: the local APICs. Must not block.</summary>
public interface IApicBus
{
    void Deliver(ApicMessage m);
}

/// <summary>
/// Snapshot of an <see cref="IoApic"/>. <see cref="Redirection"/> holds the 24 entries as the guest
/// reads them (remote IRR included); bit n of <see cref="PinLevels"/> is the electrical level of
/// input pin n. Equality compares the table by content.
/// </summary>
public sealed record IoApicState(byte Id, byte RegisterSelect, ImmutableArray<ulong> Redirection, uint PinLevels)
{
    public bool Equals(IoApicState? other) =>
        other is not null
        && Id == other.Id && RegisterSelect == other.RegisterSelect && PinLevels == other.PinLevels
        && Redirection.AsSpan().SequenceEqual(other.Redirection.AsSpan());

    public override int GetHashCode() => HashCode.Combine(Id, RegisterSelect, PinLevels, Redirection.Length);
}

/// <summary>
/// An I/O APIC with 24 input pins (Intel 82093AA datasheet, "DS" below; the ICH's version 0x20
/// adds the EOI register at offset 0x40). MMIO window of <see cref="Length"/> bytes: IOREGSEL at
/// 0x00, IOWIN at 0x10, EOI at 0x40; registers ID (0), VER (1), ARB (2), redirection table
/// 0x10–0x3F (pin n: low dword 0x10 + 2n, high dword 0x11 + 2n).
///
/// Inputs: <see cref="Pin"/> gives one <see cref="IInterruptLine"/> per pin, carrying the pin's
/// electrical level (Assert drives it high). The entry's polarity bit says which level is active
/// (DS §3.2.4 bit 13: 0 = high active, 1 = low active), so a source wired active-high (ISA IRQs,
/// the usual case) is programmed with polarity 0 by the guest, as the MP table / MADT say.
/// <list type="bullet">
/// <item>Edge-triggered pins deliver once per inactive-to-active transition while unmasked;
/// an edge while masked is lost (DS: "masked edge-sensitive interrupts are ignored").</item>
/// <item>Level-triggered pins deliver while active and unmasked and set remote IRR, which blocks
/// any further delivery until an EOI for the entry's vector (<see cref="EndOfInterrupt"/>, from a
/// LAPIC's level EOI, or a write to the EOI register) clears it; if the pin is still active then,
/// it delivers again. Unmasking an active level pin delivers at once.</item>
/// </list>
/// Delivery is instantaneous, so the delivery status bit (12) always reads 0. Only 32-bit accesses
/// to IOWIN and EOI take effect (others read 0 and are ignored, as in bhyve's vioapic); IOREGSEL
/// accepts any size. Single-threaded: its actor drives the pins, the MMIO window and the EOIs.
/// </summary>
public sealed class IoApic : IStatefulDevice, IInterruptInputs, IEndOfInterrupt
{
    public const int Pins = 24;
    public const ulong Length = 0x1000;

    public const ulong RegisterSelectOffset = 0x00;
    public const ulong WindowOffset = 0x10;
    public const ulong EoiOffset = 0x40;

    // Register indexes (DS §3.2).
    private const byte IdRegister = 0x00;
    private const byte VersionRegister = 0x01;
    private const byte ArbitrationRegister = 0x02;
    private const byte RedirectionFirst = 0x10;
    private const byte RedirectionLast = RedirectionFirst + 2 * Pins - 1;

    /// <summary>Version 0x20 (has the EOI register), max redirection entry 23 in bits 23:16.</summary>
    private const uint VersionValue = 0x20 | ((Pins - 1) << 16);

    private const int IdShift = 24;
    private const uint IdMask = 0x0F00_0000; // DS §3.2.1: bits 27:24

    // Redirection entry bits (DS §3.2.4).
    private const ulong RteVector = 0x0000_00FF;
    private const ulong RteDeliveryMode = 0b0111_0000_0000;
    private const ulong RteLogical = 0b1000_0000_0000;        // bit 11: destination mode
    private const ulong RteDeliveryStatus = 0b1_0000_0000_0000; // bit 12, read-only
    private const ulong RteActiveLow = 0b10_0000_0000_0000;     // bit 13: polarity
    private const ulong RteRemoteIrr = 0b100_0000_0000_0000;    // bit 14, read-only
    private const ulong RteLevel = 0b1000_0000_0000_0000;       // bit 15: trigger mode
    private const ulong RteMasked = 0x1_0000;                   // bit 16
    private const int RteDestinationShift = 56;
    private const ulong RteDestination = 0xFFUL << RteDestinationShift;

    /// <summary>What a guest can write: everything defined except delivery status and remote IRR.</summary>
    private const ulong RteWritable =
        RteVector | RteDeliveryMode | RteLogical | RteActiveLow | RteLevel | RteMasked | RteDestination;

    private const ulong RteReset = RteMasked; // DS §3.2.4: all entries masked after reset

    private readonly IApicBus _bus;
    private readonly ulong[] _rte = new ulong[Pins];
    private readonly LevelInput[] _lines = new LevelInput[Pins];
    private uint _levels; // electrical level of each input pin
    private byte _id;
    private byte _select;

    public IoApic(IApicBus bus, byte id = 0)
    {
        _bus = bus;
        _id = (byte)(id & 0x0F);
        Array.Fill(_rte, RteReset);
        for (var i = 0; i < Pins; i++)
        {
            var pin = i;
            _lines[i] = new LevelInput(high => SetLevel(pin, high));
        }
    }

    /// <summary>The input line of pin <paramref name="n"/> (0–23); Assert drives it high.</summary>
    public IInterruptLine Pin(int n)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(n);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(n, Pins);
        return _lines[n];
    }

    IInterruptLine? IInterruptInputs.Input(int line) => line is >= 0 and < Pins ? _lines[line] : null;

    public ulong Read(ulong offset, int size)
    {
        switch (offset)
        {
            case RegisterSelectOffset:
                return _select;
            case WindowOffset when size == 4:
                return ReadRegister(_select);
            default:
                return 0;
        }
    }

    public void Write(ulong offset, int size, ulong value)
    {
        switch (offset)
        {
            case RegisterSelectOffset:
                _select = (byte)value;
                break;
            case WindowOffset when size == 4:
                WriteRegister(_select, (uint)value);
                break;
            case EoiOffset when size == 4:
                EndOfInterrupt((byte)value);
                break;
        }
    }

    /// <summary>
    /// A level EOI for <paramref name="vector"/> (a LAPIC's EOI of a TMR-set vector, broadcast to
    /// every IOAPIC): clears remote IRR of each level entry with that vector, and delivers again
    /// from any such pin that is still active and unmasked.
    /// </summary>
    public void EndOfInterrupt(byte vector)
    {
        for (var pin = 0; pin < Pins; pin++)
        {
            var rte = _rte[pin];
            if ((rte & RteRemoteIrr) == 0 || (byte)(rte & RteVector) != vector) continue;
            _rte[pin] = rte & ~RteRemoteIrr;
            TryDeliverLevel(pin);
        }
    }

    object IStatefulDevice.SaveState() => State();

    public IoApicState State() => new(_id, _select, [.. _rte], _levels);

    /// <summary>
    /// Rebuilds an IOAPIC from a snapshot. Nothing is delivered: a level pin in service keeps its
    /// remote IRR and waits for its EOI. Throws <see cref="ArgumentException"/> on a table that
    /// is not 24 entries long.
    /// </summary>
    public static IoApic FromState(IoApicState state, IApicBus bus)
    {
        if (StateProblem(state) is { } problem) throw new ArgumentException(problem, nameof(state));
        var ioapic = new IoApic(bus, state.Id)
        {
            _select = state.RegisterSelect,
            _levels = state.PinLevels & ((1u << Pins) - 1),
        };
        for (var i = 0; i < Pins; i++)
            ioapic._rte[i] = state.Redirection[i] & (RteWritable | RteRemoteIrr);
        return ioapic;
    }

    /// <summary>What makes <paramref name="state"/> unusable for <see cref="FromState"/>, or null: a
    /// redirection table that is not <see cref="Pins"/> entries long.</summary>
    public static string? StateProblem(IoApicState state)
    {
        var length = state.Redirection.IsDefault ? 0 : state.Redirection.Length;
        return length != Pins ? $"redirection table must have {Pins} entries, not {length}" : null;
    }

    private uint ReadRegister(byte index)
    {
        switch (index)
        {
            case IdRegister:
                return (uint)_id << IdShift;
            case VersionRegister:
                return VersionValue;
            case ArbitrationRegister:
                return (uint)_id << IdShift; // DS §3.2.3: loaded from the ID
            case >= RedirectionFirst and <= RedirectionLast:
                var rte = _rte[(index - RedirectionFirst) / 2];
                return (index & 1) == 0 ? (uint)rte : (uint)(rte >> 32);
            default:
                return 0;
        }
    }

    private void WriteRegister(byte index, uint value)
    {
        switch (index)
        {
            case IdRegister:
                _id = (byte)((value & IdMask) >> IdShift);
                break;
            case >= RedirectionFirst and <= RedirectionLast:
                var pin = (index - RedirectionFirst) / 2;
                var old = _rte[pin];
                var written = (index & 1) == 0
                    ? (old & 0xFFFF_FFFF_0000_0000) | value
                    : (old & 0x0000_0000_FFFF_FFFF) | ((ulong)value << 32);
                var rte = (written & RteWritable) | (old & RteRemoteIrr);
                // Remote IRR is undefined for edge entries (DS §3.2.4); clear it so a later switch
                // back to level does not start blocked (QEMU does the same).
                if ((rte & RteLevel) == 0) rte &= ~RteRemoteIrr;
                _rte[pin] = rte;
                TryDeliverLevel(pin); // unmasking an active level pin delivers now
                break;
            default:
                break; // VER, ARB and unimplemented registers are read-only
        }
    }

    private bool IsActive(int pin) => (((_levels >> pin) & 1) != 0) ^ ((_rte[pin] & RteActiveLow) != 0);

    private void SetLevel(int pin, bool high)
    {
        var wasActive = IsActive(pin);
        if (high) _levels |= 1u << pin;
        else _levels &= ~(1u << pin);
        var active = IsActive(pin);

        var rte = _rte[pin];
        if ((rte & RteLevel) != 0)
        {
            TryDeliverLevel(pin);
        }
        else if (active && !wasActive && (rte & RteMasked) == 0)
        {
            Deliver(rte);
        }
    }

    /// <summary>A level entry delivers when its pin is active, it is unmasked and not already in service.</summary>
    private void TryDeliverLevel(int pin)
    {
        var rte = _rte[pin];
        if ((rte & RteLevel) == 0 || (rte & (RteMasked | RteRemoteIrr)) != 0 || !IsActive(pin)) return;
        _rte[pin] = rte | RteRemoteIrr;
        Deliver(rte);
    }

    private void Deliver(ulong rte) => _bus.Deliver(new ApicMessage(
        Vector: (byte)(rte & RteVector),
        Mode: (DeliveryMode)((rte & RteDeliveryMode) >> 8),
        LogicalDestination: (rte & RteLogical) != 0,
        Destination: (uint)((rte & RteDestination) >> RteDestinationShift),
        Level: true,
        LevelTriggered: (rte & RteLevel) != 0));
}
