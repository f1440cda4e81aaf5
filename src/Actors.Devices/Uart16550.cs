using System.Collections.Immutable;

namespace ActorVmm.Devices;

/// <summary>
/// Snapshot of a <see cref="Uart16550"/>. <see cref="Lsr"/> and <see cref="Msr"/> are the values a
/// guest would read (delta and error bits included); the receive FIFO is listed oldest first.
/// Equality compares the FIFO by content.
/// </summary>
public sealed record UartState(
    byte Dll,
    byte Dlm,
    byte Ier,
    byte Fcr,
    byte Lcr,
    byte Mcr,
    byte Lsr,
    byte Msr,
    byte Scr,
    bool ThrEmptyInterruptPending,
    ImmutableArray<byte> RxFifo)
{
    public bool Equals(UartState? other) =>
        other is not null
        && Dll == other.Dll && Dlm == other.Dlm && Ier == other.Ier && Fcr == other.Fcr
        && Lcr == other.Lcr && Mcr == other.Mcr && Lsr == other.Lsr && Msr == other.Msr
        && Scr == other.Scr && ThrEmptyInterruptPending == other.ThrEmptyInterruptPending
        && RxFifo.AsSpan().SequenceEqual(other.RxFifo.AsSpan());

    public override int GetHashCode() =>
        HashCode.Combine(HashCode.Combine(Dll, Dlm, Ier, Fcr, Lcr, Mcr, Lsr, Msr), Scr, ThrEmptyInterruptPending, RxFifo.Length);
}

/// <summary>
/// A 16550A UART (National Semiconductor PC16550D datasheet, referred to as "DS" below) as a
/// pure state machine: <see cref="Read"/> / <see cref="Write"/> at offsets 0..7, an interrupt
/// line, and an output sink for transmitted bytes.
///
/// Simplifications, each invisible to a driver that follows the datasheet:
/// <list type="bullet">
/// <item>The transmitter is infinitely fast: a THR write hands the byte to the sink at once, so
/// THRE and TEMT are always set and the THR-empty interrupt is re-armed by every THR write
/// (the write clears it, the finished transmission sets it again, as in QEMU and vm-superio).</item>
/// <item>No framing, parity or break errors; the only line error is overrun, and it can only
/// happen in loopback because host input is offered, never forced (<see cref="OfferInput"/>).</item>
/// <item>Character timeout (IIR 0xC) has no timer: it is reported whenever FIFOs are enabled and
/// the receive FIFO holds fewer bytes than the trigger level but not zero.</item>
/// <item>The modem lines of the host side read as a connected terminal (DCD, DSR, CTS).</item>
/// </list>
/// The interrupt line is a level: asserted while an enabled interrupt is pending and MCR.OUT2
/// is set (on a PC, OUT2 gates the UART's IRQ onto the ISA bus); the line is told only on changes.
/// </summary>
public sealed class Uart16550 : IStatefulDevice, IHostInput
{
    public const int FifoCapacity = 16;

    // Register offsets (DS Table II).
    private const int RbrThrDll = 0;
    private const int IerDlm = 1;
    private const int IirFcr = 2;
    private const int LcrOffset = 3;
    private const int McrOffset = 4;
    private const int LsrOffset = 5;
    private const int MsrOffset = 6;
    private const int ScrOffset = 7;

    // IER bits.
    private const byte IerRxData = 0b0000_0001;     // ERBFI
    private const byte IerThrEmpty = 0b0000_0010;   // ETBEI
    private const byte IerLineStatus = 0b0000_0100; // ELSI
    private const byte IerModemStatus = 0b0000_1000; // EDSSI
    private const byte IerMask = 0b0000_1111;

    // IIR values (DS Table IV), in priority order.
    private const byte IirNoInterrupt = 0b0000_0001;
    private const byte IirLineStatus = 0b0000_0110;
    private const byte IirRxData = 0b0000_0100;
    private const byte IirCharTimeout = 0b0000_1100;
    private const byte IirThrEmpty = 0b0000_0010;
    private const byte IirModemStatus = 0b0000_0000;
    private const byte IirFifosEnabled = 0b1100_0000;

    // FCR bits.
    private const byte FcrEnable = 0b0000_0001;
    private const byte FcrClearRx = 0b0000_0010;
    private const byte FcrClearTx = 0b0000_0100;
    private const byte FcrDmaMode = 0b0000_1000;
    private const byte FcrTriggerMask = 0b1100_0000;

    // LCR bits.
    private const byte LcrDlab = 0b1000_0000;

    // MCR bits.
    private const byte McrDtr = 0b0000_0001;
    private const byte McrRts = 0b0000_0010;
    private const byte McrOut1 = 0b0000_0100;
    private const byte McrOut2 = 0b0000_1000;
    private const byte McrLoop = 0b0001_0000;
    private const byte McrMask = 0b0001_1111;

    // LSR bits.
    private const byte LsrDataReady = 0b0000_0001;
    private const byte LsrOverrun = 0b0000_0010;
    private const byte LsrThrEmpty = 0b0010_0000;
    private const byte LsrTxEmpty = 0b0100_0000;
    private const byte LsrStickyErrors = LsrOverrun;

    // MSR bits.
    private const byte MsrDeltaCts = 0b0000_0001;
    private const byte MsrDeltaDsr = 0b0000_0010;
    private const byte MsrTrailingRi = 0b0000_0100;
    private const byte MsrDeltaDcd = 0b0000_1000;
    private const byte MsrDeltas = 0b0000_1111;
    private const byte MsrCts = 0b0001_0000;
    private const byte MsrDsr = 0b0010_0000;
    private const byte MsrRi = 0b0100_0000;
    private const byte MsrDcd = 0b1000_0000;

    /// <summary>The host end looks like a connected terminal.</summary>
    private const byte HostModemLines = MsrDcd | MsrDsr | MsrCts;

    /// <summary>Power-on divisor: 12 = 9600 baud from 1.8432 MHz (the value is not used for timing).</summary>
    private const ushort DefaultDivisor = 12;

    private readonly IInterruptLine _irq;
    private readonly Action<byte> _output;

    private readonly byte[] _rx = new byte[FifoCapacity];
    private int _rxHead;
    private int _rxCount;

    private byte _dll = DefaultDivisor & 0xFF;
    private byte _dlm = DefaultDivisor >> 8;
    private byte _ier;
    private byte _fcr;
    private byte _lcr;
    private byte _mcr;
    private byte _lsrErrors;
    private byte _msr = HostModemLines;
    private byte _scr;
    private bool _thrEmptyPending;
    private bool _lineLevel;

    public Uart16550(IInterruptLine irq, Action<byte> output)
    {
        _irq = irq;
        _output = output;
    }

    private bool Dlab => (_lcr & LcrDlab) != 0;
    private bool FifosEnabled => (_fcr & FcrEnable) != 0;
    private bool Loopback => (_mcr & McrLoop) != 0;
    private int RxCapacity => FifosEnabled ? FifoCapacity : 1;

    /// <summary>Receive FIFO trigger level from FCR bits 7:6 (DS Table IV footnote): 1, 4, 8 or 14 bytes.</summary>
    private int RxTriggerLevel => (_fcr >> 6) switch { 0 => 1, 1 => 4, 2 => 8, _ => 14 };

    public ulong Read(ulong offset, int size)
    {
        byte value;
        switch (offset)
        {
            case RbrThrDll:
                value = Dlab ? _dll : PopRx();
                break;
            case IerDlm:
                value = Dlab ? _dlm : _ier;
                break;
            case IirFcr:
                var id = InterruptId();
                // DS: the THR-empty interrupt is reset by reading IIR "if source of interrupt".
                if (id == IirThrEmpty) _thrEmptyPending = false;
                value = (byte)(id | (FifosEnabled ? IirFifosEnabled : 0));
                break;
            case LcrOffset:
                value = _lcr;
                break;
            case McrOffset:
                value = _mcr;
                break;
            case LsrOffset:
                value = Lsr();
                _lsrErrors = 0; // error bits are reset by reading LSR
                break;
            case MsrOffset:
                value = _msr;
                _msr &= unchecked((byte)~MsrDeltas); // delta bits are reset by reading MSR
                break;
            case ScrOffset:
                value = _scr;
                break;
            default:
                return 0xFF;
        }
        UpdateLine();
        return value;
    }

    public void Write(ulong offset, int size, ulong value)
    {
        var b = (byte)value;
        switch (offset)
        {
            case RbrThrDll when Dlab:
                _dll = b;
                break;
            case RbrThrDll:
                Transmit(b);
                break;
            case IerDlm when Dlab:
                _dlm = b;
                break;
            case IerDlm:
                var changed = (_ier ^ b) & IerThrEmpty;
                _ier = (byte)(b & IerMask);
                // Enabling ETBEI while THR is empty (always, here) raises the interrupt at once;
                // Linux checks for this (UART_BUG_THRE). Disabling it drops the pending one.
                if (changed != 0) _thrEmptyPending = (_ier & IerThrEmpty) != 0;
                break;
            case IirFcr:
                WriteFcr(b);
                break;
            case LcrOffset:
                _lcr = b;
                break;
            case McrOffset:
                WriteMcr(b);
                break;
            case LsrOffset:
            case MsrOffset:
                break; // read-only (writes are for factory test on real parts)
            case ScrOffset:
                _scr = b;
                break;
        }
        UpdateLine();
    }

    /// <summary>
    /// Puts host bytes into the receive FIFO; returns how many fit (never more than 16 held, 1
    /// without FIFOs, 0 in loopback where the serial input is disconnected). Never overruns.
    /// </summary>
    public int OfferInput(ReadOnlySpan<byte> data)
    {
        if (Loopback) return 0;
        var n = Math.Min(data.Length, RxCapacity - _rxCount);
        for (var i = 0; i < n; i++) PushRx(data[i]);
        if (n > 0) UpdateLine();
        return n;
    }

    object IStatefulDevice.SaveState() => State();

    public UartState State() => new(
        _dll, _dlm, _ier, _fcr, _lcr, _mcr, Lsr(), _msr, _scr, _thrEmptyPending,
        [.. Enumerable.Range(0, _rxCount).Select(i => _rx[(_rxHead + i) % FifoCapacity])]);

    /// <summary>
    /// Rebuilds a UART from a snapshot and drives <paramref name="irq"/> to the level the state
    /// implies (asserted or deasserted), since the new line's level is unknown.
    /// Throws <see cref="ArgumentException"/> if the FIFO holds more than the FCR allows.
    /// </summary>
    public static Uart16550 FromState(UartState state, IInterruptLine irq, Action<byte> output)
    {
        var uart = new Uart16550(irq, output)
        {
            _dll = state.Dll,
            _dlm = state.Dlm,
            _ier = (byte)(state.Ier & IerMask),
            _fcr = (state.Fcr & FcrEnable) != 0 ? (byte)(state.Fcr & (FcrEnable | FcrDmaMode | FcrTriggerMask)) : (byte)0,
            _lcr = state.Lcr,
            _mcr = (byte)(state.Mcr & McrMask),
            _lsrErrors = (byte)(state.Lsr & LsrStickyErrors),
            _msr = state.Msr,
            _scr = state.Scr,
            _thrEmptyPending = state.ThrEmptyInterruptPending,
        };
        if (StateProblem(state) is { } problem) throw new ArgumentException(problem, nameof(state));
        var fifo = state.RxFifo.IsDefault ? [] : state.RxFifo;
        foreach (var b in fifo) uart.PushRx(b);

        uart._lineLevel = uart.LineShouldBeAsserted();
        if (uart._lineLevel) irq.Assert();
        else irq.Deassert();
        return uart;
    }

    /// <summary>What makes <paramref name="state"/> unusable for <see cref="FromState"/>, or null: a
    /// receive FIFO holding more than the FCR allows (16 bytes with FIFOs enabled, 1 without).</summary>
    public static string? StateProblem(UartState state)
    {
        var capacity = (state.Fcr & FcrEnable) != 0 ? FifoCapacity : 1;
        var held = state.RxFifo.IsDefault ? 0 : state.RxFifo.Length;
        return held > capacity ? $"receive FIFO holds {held} bytes, capacity is {capacity}" : null;
    }

    private void Transmit(byte b)
    {
        if (Loopback)
        {
            // DS "Loopback": the transmitter output is wired to the receiver input.
            if (_rxCount < RxCapacity)
            {
                PushRx(b);
            }
            else
            {
                // DS LSR bit 1: in FIFO mode the new character is lost; in 16450 mode it
                // replaces the unread one in RBR.
                _lsrErrors |= LsrOverrun;
                if (!FifosEnabled) _rx[_rxHead] = b;
            }
        }
        else
        {
            _output(b);
        }
        // The write clears THRE; the instant transmission makes THR empty again.
        _thrEmptyPending = (_ier & IerThrEmpty) != 0;
    }

    private void WriteFcr(byte b)
    {
        var enable = (b & FcrEnable) != 0;
        // DS: changing FCR0 resets both FIFOs; other bits are programmed only while FCR0 is 1.
        if (enable != FifosEnabled) ClearRx();
        if (!enable)
        {
            _fcr = 0;
            return;
        }
        _fcr = (byte)(b & (FcrEnable | FcrDmaMode | FcrTriggerMask));
        if ((b & FcrClearRx) != 0) ClearRx();
        // FcrClearTx: the transmit FIFO is always empty here, so clearing it changes nothing.
    }

    private void WriteMcr(byte b)
    {
        var before = ModemLines();
        _mcr = (byte)(b & McrMask);
        var after = ModemLines();

        // DS MSR: delta bits record changes of CTS, DSR, DCD, and RI going from on to off.
        var changed = before ^ after;
        byte deltas = 0;
        if ((changed & MsrCts) != 0) deltas |= MsrDeltaCts;
        if ((changed & MsrDsr) != 0) deltas |= MsrDeltaDsr;
        if ((before & MsrRi) != 0 && (after & MsrRi) == 0) deltas |= MsrTrailingRi;
        if ((changed & MsrDcd) != 0) deltas |= MsrDeltaDcd;
        _msr = (byte)(after | (_msr & MsrDeltas) | deltas);
    }

    /// <summary>Modem input lines: in loopback, MCR outputs feed back (DS "Loopback"); else the host's.</summary>
    private byte ModemLines()
    {
        if (!Loopback) return HostModemLines;
        byte lines = 0;
        if ((_mcr & McrRts) != 0) lines |= MsrCts;
        if ((_mcr & McrDtr) != 0) lines |= MsrDsr;
        if ((_mcr & McrOut1) != 0) lines |= MsrRi;
        if ((_mcr & McrOut2) != 0) lines |= MsrDcd;
        return lines;
    }

    private byte Lsr() =>
        (byte)((_rxCount > 0 ? LsrDataReady : 0) | _lsrErrors | LsrThrEmpty | LsrTxEmpty);

    /// <summary>The highest-priority enabled pending interrupt (DS Table IV), or IirNoInterrupt.</summary>
    private byte InterruptId()
    {
        if ((_ier & IerLineStatus) != 0 && (_lsrErrors & LsrStickyErrors) != 0)
            return IirLineStatus;
        if ((_ier & IerRxData) != 0 && _rxCount > 0)
        {
            if (!FifosEnabled || _rxCount >= RxTriggerLevel) return IirRxData;
            return IirCharTimeout;
        }
        if ((_ier & IerThrEmpty) != 0 && _thrEmptyPending)
            return IirThrEmpty;
        if ((_ier & IerModemStatus) != 0 && (_msr & MsrDeltas) != 0)
            return IirModemStatus;
        return IirNoInterrupt;
    }

    private bool LineShouldBeAsserted() => (_mcr & McrOut2) != 0 && InterruptId() != IirNoInterrupt;

    private void UpdateLine()
    {
        var level = LineShouldBeAsserted();
        if (level == _lineLevel) return;
        _lineLevel = level;
        if (level) _irq.Assert();
        else _irq.Deassert();
    }

    private void PushRx(byte b)
    {
        _rx[(_rxHead + _rxCount) % FifoCapacity] = b;
        _rxCount++;
    }

    /// <summary>Pops the oldest received byte; an empty FIFO reads 0.</summary>
    private byte PopRx()
    {
        if (_rxCount == 0) return 0;
        var b = _rx[_rxHead];
        _rxHead = (_rxHead + 1) % FifoCapacity;
        _rxCount--;
        return b;
    }

    private void ClearRx()
    {
        _rxHead = 0;
        _rxCount = 0;
    }
}
