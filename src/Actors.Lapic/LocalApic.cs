using System.Buffers.Binary;
using System.Runtime.InteropServices;
using ActorVmm.Devices;
using static ActorVmm.Lapic.ApicOffsets;

namespace ActorVmm.Lapic;

/// <summary>
/// A local APIC (Intel SDM Vol 3A chapter 10, "Advanced Programmable Interrupt Controller"; §
/// numbers below are that chapter's) as a pure state machine, after bhyve's vlapic.c.
///
/// The registers live in a 4 KiB Apic Page at their xAPIC offsets (<see cref="ApicOffsets"/>);
/// the guest reaches them through <see cref="ReadMmio"/>/<see cref="WriteMmio"/> (xAPIC) or
/// <see cref="ReadMsr"/>/<see cref="WriteMsr(uint, ulong, ulong?)"/> (x2APIC, IA32_APIC_BASE, IA32_TSC_DEADLINE).
/// Interrupts come in through <see cref="Accept"/>/<see cref="Deliver"/> and the LINT pins, and
/// leave as <see cref="PendingInterrupt"/> → <see cref="InterruptAccepted"/> (the seed's
/// vlapic_pending_intr / vlapic_intr_accepted). IPIs, level EOIs and non-IRR events (NMI, INIT, ...)
/// go to an <see cref="ILapicEvents"/>. The timer runs on an <see cref="IDeviceClock"/>.
///
/// Choices where the SDM leaves room (each as KVM or bhyve do):
/// <list type="bullet">
/// <item>The APIC ID is read-only in xAPIC mode too (model-specific per §10.4.6; bhyve).</item>
/// <item>APR and RRD read 0 (P6-era registers; KVM, QEMU). No EOI-broadcast suppression.</item>
/// <item>Sub-dword MMIO reads inside a register's low 4 bytes return those bytes; any other
/// unaligned access reads 0 and writes are dropped (§10.4.1 asks for aligned 32-bit accesses).</item>
/// <item>A software-disabled APIC drops fixed and lowest-priority messages (bhyve, KVM) but keeps
/// what is already in IRR/ISR deliverable (§10.4.7.2).</item>
/// <item>Fixed, lowest-priority and NMI IPIs written level-triggered are sent edge-triggered when
/// Level=1 and dropped when Level=0 (Table 10-3 note 2).</item>
/// <item>The timer catches up lazily: every register access first applies expiries due by now,
/// so <see cref="OnDeadline"/> may come late or early; expiries while the LVT is masked cost no
/// callback (<see cref="NextDeadline"/> is null) and deliver nothing, as on hardware.</item>
/// </list>
/// </summary>
public sealed class LocalApic : ITimedDevice
{
    public const int PageSize = 4096;
    public const ulong DefaultBaseAddress = 0xFEE0_0000;

    /// <summary>Version register: integrated APIC version 0x14, Max LVT Entry 6 (seven LVTs, CMCI included), §10.4.8.</summary>
    public const uint VersionValue = 0x14 | (6u << 16);

    // IA32_APIC_BASE (§10.4.4, Figure 10-5).
    public const ulong BaseBsp = 1UL << 8;
    public const ulong BaseExtd = 1UL << 10;
    public const ulong BaseEnable = 1UL << 11;

    // Spurious-interrupt vector register (§10.9, Figure 10-23).
    private const uint SvrEnable = 1u << 8;
    private const uint SvrWritable = 0b11_1111_1111; // vector, APIC enable, focus checking

    // LVT entries (§10.5.1, Figure 10-8).
    private const uint LvtDeliveryStatus = 1u << 12;
    private const uint LvtRemoteIrr = 1u << 14;
    private const uint LvtTriggerLevel = 1u << 15;
    private const uint LvtMasked = 1u << 16;
    private const int LvtTimerModeShift = 17;

    // ICR (§10.6.1, Figure 10-12).
    private const uint IcrDestLogical = 1u << 11;
    private const uint IcrDeliveryStatus = 1u << 12;
    private const uint IcrLevelAssert = 1u << 14;
    private const uint IcrTriggerLevel = 1u << 15;
    private const int IcrShorthandShift = 18;
    private const uint IcrLowWritable = 0x000C_CFFF; // bits 11:0, 14, 15, 19:18

    private const uint LdrXApicWritable = 0xFF00_0000;
    private const uint DfrModelMask = 0xF000_0000;
    private const uint DivideWritable = 0b1011; // bits 0, 1, 3 (§10.5.4, Figure 10-10)

    private static readonly int[] LvtRegisters = [LvtCmci, LvtTimer, LvtThermal, LvtPerfMon, LvtLint0, LvtLint1, LvtError];

    private readonly byte[] _page = new byte[PageSize];
    private readonly ILapicEvents _events;
    private readonly IDeviceClock _clock;
    private readonly LapicOptions _options;
    private readonly bool[] _lintLevel = new bool[2];
    private uint _id;
    private ulong _apicBase;
    private uint _esrPending;

    // One-shot / periodic timer: counts elapsed = _timerOffset + counts since _timerStart.
    private bool _timerArmed;
    private TimeSpan _timerStart;
    private long _timerOffset;
    private long _timerPeriods;
    private ulong _tscDeadline;

    /// <summary>The guest's TSC minus the one the pairing in the options predicts, as last sampled
    /// (see <see cref="WriteMsr(uint, ulong, ulong?)"/>).</summary>
    private long _tscSkew;

    /// <param name="apicId">the initial APIC ID (CPUID.01H:EBX[31:24] / CPUID.0BH:EDX)</param>
    /// <param name="bsp">IA32_APIC_BASE.BSP; guest writes cannot change it</param>
    /// <param name="events">takes what leaves the APIC (IPIs, level EOIs, vcpu events)</param>
    /// <param name="clock">the timer's time</param>
    /// <param name="options">timer and TSC frequencies, CPUID-dependent features; null: <see cref="LapicOptions.Default"/></param>
    public LocalApic(uint apicId, ILapicEvents events, IDeviceClock clock, LapicOptions? options = null, bool bsp = false)
    {
        _id = apicId;
        _events = events;
        _clock = clock;
        _options = options ?? LapicOptions.Default;
        _apicBase = ResetBase(bsp);
        Lint0 = new LevelInput(high => SetLint(0, high));
        Lint1 = new LevelInput(high => SetLint(1, high));
        ResetRegisters();
    }

    public static LocalApic FromState(LapicState state, ILapicEvents events, IDeviceClock clock, LapicOptions? options = null)
    {
        var apic = new LocalApic(state.ApicId, events, clock, options);
        apic.Restore(state);
        return apic;
    }

    public uint ApicId => _id;

    /// <summary>IA32_APIC_BASE (MSR 0x1B). Its base address field (bits MAXPHYADDR-1:12) places the
    /// xAPIC register page (SDM Vol 3A §10.4.4, "Relocating the Local APIC Registers").</summary>
    public ulong ApicBase => _apicBase;

    /// <summary>IA32_APIC_BASE after power-up or reset (SDM Vol 3A §10.4.4): the page at 0xFEE00000,
    /// the APIC enabled in xAPIC mode, BSP set on the bootstrap processor only.</summary>
    public static ulong ResetBase(bool bsp) => DefaultBaseAddress | BaseEnable | (bsp ? BaseBsp : 0);

    /// <summary>The physical address of the xAPIC register page named by IA32_APIC_BASE
    /// <paramref name="apicBase"/>, or null when the page is not decoded: the APIC is disabled
    /// globally or in x2APIC mode (SDM Vol 3A §10.4.3, §10.12.2).</summary>
    public static ulong? XApicPage(ulong apicBase) =>
        (apicBase & (BaseEnable | BaseExtd)) == BaseEnable ? apicBase & ~(ulong)(PageSize - 1) & ((1UL << 52) - 1) : null;

    public ApicMode Mode => (_apicBase & BaseEnable) == 0 ? ApicMode.Disabled
        : (_apicBase & BaseExtd) != 0 ? ApicMode.X2Apic : ApicMode.XApic;

    /// <summary>SVR bit 8 (§10.4.3).</summary>
    public bool SoftwareEnabled => (Reg(Svr) & SvrEnable) != 0;

    /// <summary>The highest vector in service (ISR), or null: the one an EOI retires.</summary>
    public int? InServiceVector => HighestBit(Isr) is var v and >= 0 ? v : null;

    /// <summary>The Apic Page as stored (Current Count is computed on read and not kept here).</summary>
    public ReadOnlySpan<byte> ApicPage => _page;

    /// <summary>The LINT0 pin: delivers per LVT LINT0 (ExtINT from the 8259 INTR output, usually).
    /// With the APIC globally disabled it is the processor's INTR pin (§10.4.3). Like the rest of
    /// the model it is not thread-safe: other actors send <c>VlapicProtocol.Lint</c> instead.</summary>
    public IInterruptLine Lint0 { get; }

    /// <summary>The LINT1 pin: delivers per LVT LINT1 (NMI, usually); the NMI pin when disabled.</summary>
    public IInterruptLine Lint1 { get; }

    // ---- Guest access ------------------------------------------------------------------------

    /// <summary>An xAPIC MMIO read at an offset in the page. Outside xAPIC mode the page is not
    /// decoded (§10.4.3, §10.12.2) and reads as no device (all ones).</summary>
    public ulong ReadMmio(ulong offset, int size)
    {
        var ones = AccessSize.AllOnes(size);
        if (Mode != ApicMode.XApic) return ones;
        var within = (int)(offset & 0xF);
        if (offset >= PageSize || size is not (1 or 2 or 4) || within + size > 4) return 0;
        CatchUpTimer();
        if (!ReadRegister((int)(offset - (ulong)within), x2: false, out var value))
        {
            SetError(ApicError.IllegalRegisterAddress);
            return 0;
        }
        return (value >> (within * 8)) & ones;
    }

    /// <summary>An xAPIC MMIO write: only aligned 32-bit writes reach a register.</summary>
    public void WriteMmio(ulong offset, int size, ulong value)
    {
        if (Mode != ApicMode.XApic || offset >= PageSize || size != 4 || (offset & 0xF) != 0) return;
        CatchUpTimer();
        WriteRegister((int)offset, (uint)value, x2: false);
    }

    /// <summary>RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register. False: the
    /// caller injects #GP (x2APIC register outside x2APIC mode, reserved or write-only, §10.12.1.2).</summary>
    public bool ReadMsr(uint msr, out ulong value)
    {
        value = 0;
        switch (msr)
        {
            case ApicMsrs.ApicBase:
                value = _apicBase;
                return true;
            case ApicMsrs.TscDeadline:
                CatchUpTimer();
                // §10.5.4.1: reads 0 outside TSC-deadline mode and once the deadline has passed.
                value = Mode != ApicMode.Disabled && CurrentTimerMode == TimerMode.TscDeadline ? _tscDeadline : 0;
                return true;
        }
        if (X2ApicRegister(msr) is not { } reg) return false;
        CatchUpTimer();
        if (reg == IcrLow)
        {
            value = ((ulong)Reg(IcrHigh) << 32) | Reg(IcrLow);
            return true;
        }
        if (!ReadRegister(reg, x2: true, out var v)) return false;
        value = v;
        return true;
    }

    /// <summary>WRMSR; false: the caller injects #GP. In x2APIC mode a non-zero write to a reserved
    /// bit, a write to a read-only register and any access to a reserved MSR fault (§10.12.1.3).</summary>
    public bool WriteMsr(uint msr, ulong value) => WriteMsr(msr, value, null);

    /// <summary>
    /// WRMSR, with the guest's TSC read when the write left the guest (<paramref name="guestTsc"/>,
    /// for IA32_TSC_DEADLINE). The deadline counts in the guest's TSC, and the timer goes off on the
    /// VM clock: the options pair the two once, at build, and a host clock whose rate differs from the
    /// TSC's (NTP's slew of CLOCK_MONOTONIC, up to 500 ppm; another clocksource under an emulated
    /// host) drifts away from it. A timer that fires before the guest's TSC reached the deadline finds
    /// the guest's handler with nothing expired, re-arming the same deadline at once: an interrupt
    /// storm for as long as the drift. So each deadline write re-pairs the two with the sample, as
    /// KVM's own emulation reads the guest's TSC when it arms its timer (x86 lapic.c,
    /// start_sw_tscdeadline).
    /// </summary>
    public bool WriteMsr(uint msr, ulong value, ulong? guestTsc)
    {
        switch (msr)
        {
            case ApicMsrs.ApicBase:
                return WriteApicBase(value);
            case ApicMsrs.TscDeadline:
                CatchUpTimer();
                if (guestTsc is { } tsc) _tscSkew = (long)Int128.Clamp(tsc - (TscAt(_clock.Now) - (Int128)_tscSkew), long.MinValue, long.MaxValue);
                if (Mode != ApicMode.Disabled && CurrentTimerMode == TimerMode.TscDeadline)
                {
                    _tscDeadline = value; // 0 disarms
                    CatchUpTimer();       // a deadline already passed fires at once
                }
                return true;
        }
        if (X2ApicRegister(msr) is not { } reg) return false;
        CatchUpTimer();
        if (reg == IcrLow)
        {
            // §10.12.9: one 64-bit write, destination in 63:32; delivery status is gone (reserved).
            var low = (uint)value;
            if ((low & ~IcrLowWritable) != 0) return false;
            SetReg(IcrLow, low);
            SetReg(IcrHigh, (uint)(value >> 32));
            SendIcr(low, (uint)(value >> 32));
            return true;
        }
        if (value >> 32 != 0) return false;
        return WriteRegister(reg, (uint)value, x2: true);
    }

    /// <summary>The register an x2APIC MSR names (offset = (MSR - 800H) &lt;&lt; 4, §10.12.1.2, Table
    /// 10-6), or null: not an x2APIC MSR, or the APIC is not in x2APIC mode, and the access is a #GP.
    /// Which registers exist and which accesses they take is the register's own check.</summary>
    private int? X2ApicRegister(uint msr) =>
        Mode == ApicMode.X2Apic && msr is >= ApicMsrs.X2ApicFirst and <= ApicMsrs.X2ApicLast
            ? (int)(msr - ApicMsrs.X2ApicFirst) << 4
            : null;

    /// <summary>WRMSR IA32_APIC_BASE (§10.4.4, §10.12.5). False (#GP): reserved bits, EN=0 with
    /// EXTD=1, or a transition Figure 10-27 forbids (disabled→x2APIC, x2APIC→xAPIC).</summary>
    public bool WriteApicBase(ulong value)
    {
        var reserved = 0xFFUL | (1UL << 9) | (~0UL << _options.PhysicalAddressBits)
            | (_options.X2ApicSupported ? 0 : BaseExtd);
        if ((value & reserved) != 0) return false;
        var enable = (value & BaseEnable) != 0;
        var extd = (value & BaseExtd) != 0;
        if (!enable && extd) return false;
        var to = !enable ? ApicMode.Disabled : extd ? ApicMode.X2Apic : ApicMode.XApic;
        var from = Mode;
        if ((from, to) is (ApicMode.Disabled, ApicMode.X2Apic) or (ApicMode.X2Apic, ApicMode.XApic)) return false;

        CatchUpTimer();
        _apicBase = (value & ~BaseBsp) | (_apicBase & BaseBsp);
        if (from == to) return true;
        switch (to)
        {
            case ApicMode.Disabled:
            case ApicMode.XApic: // only from disabled, already in the reset state: ID back in xAPIC format
                // §10.4.3: a globally disabled APIC returns to its power-up state (§10.4.7.1).
                ResetRegisters();
                break;
            case ApicMode.X2Apic:
                // §10.12.5.1: the rest of the state is kept, except: ID becomes the 32-bit x2APIC
                // ID, LDR is derived from it, and ICR high is not preserved.
                SetReg(Id, _id);
                SetReg(Ldr, X2ApicLdr(_id));
                SetReg(IcrHigh, 0);
                break;
        }
        return true;
    }

    // ---- Interrupts in ---------------------------------------------------------------------

    /// <summary>
    /// Accepts a fixed or lowest-priority interrupt into IRR and sets (level) or clears (edge) its
    /// TMR bit (§10.8.4). Returns false when nothing was accepted: APIC disabled (globally or by
    /// software), or an illegal vector 0-15 (sets ESR "received illegal vector", §10.5.3).
    /// Repeated edges before service coalesce in IRR. A level-triggered de-assert message never
    /// reaches here: <see cref="Vlapic.Deliver"/> drops it.
    /// </summary>
    public bool Accept(byte vector, bool level, TriggerMode trigger)
    {
        if (Mode == ApicMode.Disabled || !SoftwareEnabled) return false;
        if (vector < 16)
        {
            SetError(ApicError.ReceivedIllegalVector);
            return false;
        }
        SetIrr(vector, trigger);
        return true;
    }

    /// <summary>
    /// Delivers an interrupt message already routed to this APIC. Fixed and lowest-priority go to
    /// <see cref="Accept"/>; NMI, SMI, SIPI and ExtINT go to <see cref="ILapicEvents.VcpuEvent"/>;
    /// INIT resets the APIC (<see cref="InitReset"/>) first. The message is one the APIC bus
    /// defines (<see cref="Vlapic.Deliver"/> drops the others and the level-triggered de-asserts,
    /// such as INIT level de-assert, which only re-synchronised arbitration IDs on P6). Returns
    /// whether the message had an effect.
    /// </summary>
    public bool Deliver(DeliveryMode mode, byte vector, bool level, TriggerMode trigger)
    {
        if (Mode == ApicMode.Disabled) return false;
        switch (mode)
        {
            case DeliveryMode.Fixed or DeliveryMode.LowestPriority:
                return Accept(vector, level, trigger);
            case DeliveryMode.Nmi:
                _events.VcpuEvent(VcpuEventKind.Nmi, 0);
                return true;
            case DeliveryMode.Smi:
                _events.VcpuEvent(VcpuEventKind.Smi, 0);
                return true;
            case DeliveryMode.ExtInt:
                _events.VcpuEvent(VcpuEventKind.ExtInt, 0);
                return true;
            case DeliveryMode.StartUp:
                _events.VcpuEvent(VcpuEventKind.StartUp, vector);
                return true;
            case DeliveryMode.Init:
                InitReset();
                _events.VcpuEvent(VcpuEventKind.Init, 0);
                return true;
            default:
                return false;
        }
    }

    /// <summary>
    /// The APIC's side of INIT (§10.4.7.3): the power-up state of §10.4.7.1 (IRR, ISR, TMR, ICR,
    /// LDR, TPR, timer and divide zero; DFR all ones; LVTs masked; SVR 0xFF, i.e. software
    /// disabled), except that the APIC ID and IA32_APIC_BASE (so x2APIC mode) are kept.
    /// </summary>
    public void InitReset() => ResetRegisters();

    /// <summary>
    /// The highest-priority vector in IRR whose priority class is above the PPR's, or null
    /// (§10.8.3.1: "the processor ... dispatches the highest-priority interrupt in IRR if its
    /// priority class is higher than the PPR's"). bhyve's vlapic_pending_intr.
    /// </summary>
    public int? PendingInterrupt()
    {
        if (Mode == ApicMode.Disabled) return null;
        var vector = HighestBit(Irr);
        if (vector < 0) return null;
        return (vector & 0xF0) > (Reg(Ppr) & 0xF0) ? vector : null;
    }

    /// <summary>The vcpu took <paramref name="vector"/> (normally the one <see cref="PendingInterrupt"/>
    /// named): IRR → ISR, PPR raised (§10.8.4). bhyve's vlapic_intr_accepted.</summary>
    public void InterruptAccepted(byte vector)
    {
        if (vector < 16 || !TestBit(Irr, vector)) return; // not requested: a stale or repeated acceptance
        SetBit(Irr, vector, false);
        SetBit(Isr, vector, true);
        UpdatePpr();
    }

    /// <summary>
    /// What a write to the EOI register does (§10.8.5): clears the highest ISR bit; if that
    /// vector's TMR bit is set, reports <see cref="ILapicEvents.LevelEoi"/> and clears Remote IRR
    /// of a level-triggered LINT entry with that vector (re-delivering if the pin is still asserted).
    /// </summary>
    public void EndOfInterrupt()
    {
        var vector = HighestBit(Isr);
        if (vector < 0) return;
        SetBit(Isr, vector, false);
        UpdatePpr();
        if (!TestBit(Tmr, vector)) return;
        _events.LevelEoi((byte)vector);
        for (var pin = 0; pin < 2; pin++)
        {
            var reg = LintRegister(pin);
            var lvt = Reg(reg);
            if ((lvt & LvtRemoteIrr) == 0 || (byte)lvt != vector) continue;
            SetReg(reg, lvt & ~LvtRemoteIrr);
            OnLint(pin, rising: false);
        }
    }

    // ---- Destinations ------------------------------------------------------------------------

    /// <summary>Physical destination (§10.6.2.1): this APIC's ID, or the broadcast ID
    /// (0xFF in xAPIC mode, 0xFFFFFFFF in x2APIC mode). A disabled APIC matches nothing.</summary>
    public bool MatchesPhysical(uint destination) => Mode switch
    {
        ApicMode.XApic => destination is 0xFF or 0xFFFF_FFFF || destination == (_id & 0xFF),
        ApicMode.X2Apic => destination == 0xFFFF_FFFF || destination == _id,
        _ => false,
    };

    /// <summary>
    /// Logical destination (§10.6.2.2). xAPIC flat model (DFR 1111b): any bit of the 8-bit MDA in
    /// LDR[31:24]. xAPIC cluster model (DFR 0000b): MDA[7:4] equals the cluster in LDR[31:28] and
    /// MDA[3:0] shares a bit with LDR[27:24]. x2APIC (§10.12.10.2): MDA[31:16] equals LDR[31:16]
    /// and MDA[15:0] shares a bit with LDR[15:0]. All ones is the broadcast in every model.
    /// </summary>
    public bool MatchesLogical(uint destination)
    {
        switch (Mode)
        {
            case ApicMode.XApic:
                var mda = destination & 0xFF;
                if (mda == 0xFF) return true;
                var logicalId = Reg(Ldr) >> 24;
                return (Reg(Dfr) >> 28) switch
                {
                    0xF => (logicalId & mda) != 0,
                    0x0 => logicalId >> 4 == mda >> 4 && (logicalId & mda & 0xF) != 0,
                    _ => false,
                };
            case ApicMode.X2Apic:
                if (destination == 0xFFFF_FFFF) return true;
                var ldr = Reg(Ldr);
                return ldr >> 16 == destination >> 16 && (ldr & destination & 0xFFFF) != 0;
            default:
                return false;
        }
    }

    /// <summary>x2APIC logical ID (§10.12.10.2): cluster = ID[19:4] in bits 31:16, bit ID[3:0] in bits 15:0.</summary>
    public static uint X2ApicLdr(uint apicId) => ((apicId >> 4) << 16) | (1u << (int)(apicId & 0xF));

    // ---- Timer (§10.5.4) -------------------------------------------------------------------------

    /// <summary>Divide Configuration Register → divisor: bits 3,1:0 = 000b..110b divide by 2..128, 111b by 1.</summary>
    public static int DivisorOf(uint divideConfiguration)
    {
        var code = (divideConfiguration & 0b11) | ((divideConfiguration >> 1) & 0b100);
        return code == 0b111 ? 1 : 2 << (int)code;
    }

    public TimeSpan? NextDeadline
    {
        get
        {
            if (Mode == ApicMode.Disabled || (Reg(LvtTimer) & LvtMasked) != 0) return null;
            var mode = CurrentTimerMode;
            if (mode == TimerMode.TscDeadline) return _tscDeadline == 0 ? null : TimeOfTsc(_tscDeadline);
            if (!_timerArmed) return null;
            long initial = Reg(TimerInitialCount);
            var target = mode == TimerMode.Periodic ? (_timerPeriods + 1) * initial : initial;
            return _timerStart + DurationOfCounts(target - _timerOffset);
        }
    }

    public void OnDeadline() => CatchUpTimer();

    private TimerMode CurrentTimerMode => TimerModeOf(Reg(LvtTimer));

    private TimerMode TimerModeOf(uint lvt) => ((lvt >> LvtTimerModeShift) & 0b11) switch
    {
        0b01 => TimerMode.Periodic,
        0b10 when _options.TscDeadlineSupported => TimerMode.TscDeadline,
        _ => TimerMode.OneShot, // 11b is reserved; an xAPIC write of it counts as one-shot
    };

    private int Divisor => DivisorOf(Reg(TimerDivide));

    private long CountsSince(TimeSpan start)
    {
        var ticks = (_clock.Now - start).Ticks;
        if (ticks <= 0) return 0;
        return (long)((Int128)ticks * _options.TimerFrequencyHz / ((Int128)TimeSpan.TicksPerSecond * Divisor));
    }

    /// <summary>Clock time for <paramref name="counts"/> timer counts, rounded up so that the
    /// counts have surely elapsed at the deadline.</summary>
    private TimeSpan DurationOfCounts(long counts)
    {
        var num = (Int128)counts * Divisor * TimeSpan.TicksPerSecond;
        return TimeSpan.FromTicks(CeilToTicks(num, _options.TimerFrequencyHz));
    }

    /// <summary>The guest's TSC at clock time <paramref name="time"/>: the options' pairing, moved by the last sample.</summary>
    private ulong TscAt(TimeSpan time)
    {
        var tsc = TscAtZero + (time.Ticks <= 0 ? 0 : (Int128)time.Ticks * _options.TscFrequencyHz / TimeSpan.TicksPerSecond);
        return tsc <= 0 ? 0 : tsc >= ulong.MaxValue ? ulong.MaxValue : (ulong)tsc;
    }

    /// <summary>The guest's TSC when the clock read zero, by the pairing and the last sample (may be negative).</summary>
    private Int128 TscAtZero => (Int128)_options.TscAtClockZero + _tscSkew;

    /// <summary>Clock time when the guest's TSC reaches <paramref name="tsc"/> (zero for one already passed at clock zero).</summary>
    private TimeSpan TimeOfTsc(ulong tsc) => tsc <= TscAtZero ? TimeSpan.Zero
        : TimeSpan.FromTicks(CeilToTicks((tsc - TscAtZero) * TimeSpan.TicksPerSecond, _options.TscFrequencyHz));

    private static long CeilToTicks(Int128 numerator, long denominator)
    {
        var ticks = (numerator + denominator - 1) / denominator;
        return ticks > TimeSpan.MaxValue.Ticks ? TimeSpan.MaxValue.Ticks : (long)ticks;
    }

    private long ElapsedCounts() => _timerOffset + CountsSince(_timerStart);

    private uint CurrentCount()
    {
        if (!_timerArmed || CurrentTimerMode == TimerMode.TscDeadline) return 0;
        long initial = Reg(TimerInitialCount);
        var elapsed = ElapsedCounts();
        if (CurrentTimerMode == TimerMode.Periodic) return (uint)(initial - elapsed % initial);
        return elapsed >= initial ? 0 : (uint)(initial - elapsed);
    }

    /// <summary>Applies the expiries due by the clock's now: one-shot reaches 0 and stops,
    /// periodic reloads (missed periods coalesce: IRR holds one bit), TSC deadline fires and clears.</summary>
    private void CatchUpTimer()
    {
        var mode = CurrentTimerMode;
        if (mode == TimerMode.TscDeadline)
        {
            if (_tscDeadline == 0 || TscAt(_clock.Now) < _tscDeadline) return;
            _tscDeadline = 0;
            FireLvt(LvtTimer);
            return;
        }
        if (!_timerArmed) return;
        long initial = Reg(TimerInitialCount);
        var elapsed = ElapsedCounts();
        if (mode == TimerMode.Periodic)
        {
            var periods = elapsed / initial;
            if (periods <= _timerPeriods) return;
            _timerPeriods = periods;
            FireLvt(LvtTimer);
        }
        else if (elapsed >= initial)
        {
            _timerArmed = false;
            FireLvt(LvtTimer);
        }
    }

    /// <summary>Initial Count written (one-shot / periodic): count down from it, from now; 0 stops.</summary>
    private void StartTimer()
    {
        _timerArmed = Reg(TimerInitialCount) != 0;
        _timerStart = _clock.Now;
        _timerOffset = 0;
        _timerPeriods = 0;
    }

    /// <summary>Restarts the bookkeeping at now with the counts elapsed so far, before the divisor
    /// or the one-shot/periodic mode changes (the count continues from where it is).</summary>
    private void RebaseTimer()
    {
        if (!_timerArmed) return;
        long initial = Reg(TimerInitialCount);
        var elapsed = ElapsedCounts();
        _timerOffset = CurrentTimerMode == TimerMode.Periodic ? elapsed % initial : elapsed;
        _timerStart = _clock.Now;
        _timerPeriods = 0;
    }

    private void TimerModeChanging(uint oldLvt, uint newLvt)
    {
        var from = TimerModeOf(oldLvt);
        var to = TimerModeOf(newLvt);
        if (from == to) return;
        if (from == TimerMode.TscDeadline || to == TimerMode.TscDeadline)
        {
            // §10.5.4.1: a write that changes the timer mode disarms the timer (as KVM: into or
            // out of TSC-deadline mode, clearing the initial count and the deadline).
            _timerArmed = false;
            _tscDeadline = 0;
            SetReg(TimerInitialCount, 0);
        }
        else
        {
            RebaseTimer();
        }
    }

    // ---- Snapshot ----------------------------------------------------------------------------

    public LapicState State()
    {
        var page = (byte[])_page.Clone();
        BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(TimerCurrentCount), CurrentCount());
        return new LapicState(ImmutableCollectionsMarshal.AsImmutableArray(page), _id, _apicBase, _esrPending,
            _timerArmed, _timerStart, _timerOffset, _timerPeriods, _tscDeadline, _lintLevel[0], _lintLevel[1]);
    }

    /// <summary>Puts this APIC (and its LINT lines, which stay the same objects) in <paramref name="state"/>.</summary>
    public void Restore(LapicState state)
    {
        if (state.ApicPage.Length != PageSize)
            throw new ArgumentException($"an Apic Page is {PageSize} bytes, not {state.ApicPage.Length}", nameof(state));
        state.ApicPage.CopyTo(_page);
        SetReg(TimerCurrentCount, 0); // computed on read
        _id = state.ApicId;
        _apicBase = state.ApicBase;
        _esrPending = state.EsrPending;
        _timerArmed = state.TimerArmed;
        _timerStart = state.TimerStart;
        _timerOffset = state.TimerCountOffset;
        _timerPeriods = state.TimerPeriods;
        _tscDeadline = state.TscDeadline;
        _lintLevel[0] = state.Lint0Level;
        _lintLevel[1] = state.Lint1Level;
    }

    // ---- Registers -----------------------------------------------------------------------------

    /// <summary>Reads the register at a 16-byte aligned offset. False: no such register in this
    /// mode (xAPIC: illegal register address; x2APIC: #GP, also for write-only EOI and SELF IPI).</summary>
    private bool ReadRegister(int reg, bool x2, out uint value)
    {
        value = 0;
        switch (reg)
        {
            case Id or ApicOffsets.Version or Tpr or Ppr or Ldr or Svr or Esr or TimerInitialCount or TimerDivide:
            case LvtCmci or LvtTimer or LvtThermal or LvtPerfMon or LvtLint0 or LvtLint1 or LvtError:
            case >= Isr and < Esr: // ISR, TMR, IRR
                value = Reg(reg);
                return true;
            case IcrLow:
                value = Reg(IcrLow) & ~IcrDeliveryStatus; // always idle: delivery is immediate
                return true;
            case TimerCurrentCount:
                value = CurrentCount();
                return true;
            case Dfr or IcrHigh:
                if (x2) return false;
                value = Reg(reg);
                return true;
            case Apr or Rrd:
                return !x2;
            case Eoi:
                return !x2; // write-only; an xAPIC read returns 0
            default:
                return false;
        }
    }

    /// <summary>Writes the register at a 16-byte aligned offset. xAPIC: reserved bits and
    /// read-only registers are ignored, unknown offsets set ESR bit 7. x2APIC: each of those
    /// returns false (#GP), as does a non-zero write to EOI or ESR.</summary>
    private bool WriteRegister(int reg, uint value, bool x2)
    {
        switch (reg)
        {
            case Tpr:
                if (x2 && value > 0xFF) return false;
                SetReg(Tpr, value & 0xFF);
                UpdatePpr();
                return true;
            case Eoi:
                if (x2 && value != 0) return false;
                EndOfInterrupt();
                return true;
            case Ldr:
                if (x2) return false; // derived from the x2APIC ID, read-only
                SetReg(Ldr, value & LdrXApicWritable);
                return true;
            case Dfr:
                if (x2) return false;
                SetReg(Dfr, (value & DfrModelMask) | ~DfrModelMask); // bits 27:0 reserved, read as ones
                return true;
            case Svr:
                if (x2 && (value & ~SvrWritable) != 0) return false;
                SetReg(Svr, value & SvrWritable);
                if (!SoftwareEnabled)
                    foreach (var lvt in LvtRegisters) SetReg(lvt, Reg(lvt) | LvtMasked); // §10.4.7.2
                return true;
            case Esr:
                if (x2 && value != 0) return false;
                // §10.5.3: a write makes the errors accumulated since the previous write readable
                // and starts accumulating afresh.
                SetReg(Esr, _esrPending);
                _esrPending = 0;
                return true;
            case LvtCmci or LvtTimer or LvtThermal or LvtPerfMon or LvtLint0 or LvtLint1 or LvtError:
                return WriteLvt(reg, value, x2);
            case IcrLow: // xAPIC only: the x2APIC ICR is one 64-bit MSR (WriteMsr)
                SetReg(IcrLow, value & IcrLowWritable);
                SendIcr(value & IcrLowWritable, Reg(IcrHigh) >> 24);
                return true;
            case IcrHigh:
                if (x2) return false;
                SetReg(IcrHigh, value & 0xFF00_0000);
                return true;
            case TimerInitialCount:
                if (CurrentTimerMode == TimerMode.TscDeadline) return true; // §10.5.4.1: ignored
                SetReg(TimerInitialCount, value);
                StartTimer();
                return true;
            case TimerDivide:
                if (x2 && (value & ~DivideWritable) != 0) return false;
                RebaseTimer();
                SetReg(TimerDivide, value & DivideWritable);
                return true;
            case SelfIpi when x2:
                // §10.12.11: a fixed, edge-triggered self IPI with the vector in bits 7:0.
                if (value > 0xFF) return false;
                if (value < 16) SetError(ApicError.SendIllegalVector);
                else Accept((byte)value, level: true, TriggerMode.Edge);
                return true;
            case Id or ApicOffsets.Version or Ppr or TimerCurrentCount or (>= Isr and < Esr):
                return !x2; // read-only
            case Apr or Rrd:
                return !x2; // read-only in xAPIC, absent in x2APIC
            default:
                if (!x2) SetError(ApicError.IllegalRegisterAddress);
                return false;
        }
    }

    /// <summary>Bits a guest may write, and bits that exist (read-only ones included), per LVT (Figure 10-8).</summary>
    private (uint Writable, uint Defined) LvtBits(int reg)
    {
        const uint vector = 0xFF;
        const uint deliveryMode = 0b111u << 8;
        const uint polarity = 1u << 13;
        switch (reg)
        {
            case LvtTimer:
                var mode = (_options.TscDeadlineSupported ? 0b11u : 0b01u) << LvtTimerModeShift;
                return (vector | LvtMasked | mode, vector | LvtMasked | mode | LvtDeliveryStatus);
            case LvtLint0 or LvtLint1:
                var lint = vector | deliveryMode | polarity | LvtTriggerLevel | LvtMasked;
                return (lint, lint | LvtDeliveryStatus | LvtRemoteIrr);
            case LvtError:
                return (vector | LvtMasked, vector | LvtMasked | LvtDeliveryStatus);
            default: // CMCI, thermal, performance monitoring
                return (vector | deliveryMode | LvtMasked, vector | deliveryMode | LvtMasked | LvtDeliveryStatus);
        }
    }

    private bool WriteLvt(int reg, uint value, bool x2)
    {
        var (writable, defined) = LvtBits(reg);
        if (x2 && (value & ~defined) != 0) return false;
        if (x2 && reg == LvtTimer && ((value >> LvtTimerModeShift) & 0b11) == 0b11) return false;
        var old = Reg(reg);
        var lvt = value & writable;
        if ((lvt & LvtTriggerLevel) != 0) lvt |= old & LvtRemoteIrr; // read-only, kept while level-triggered
        if (!SoftwareEnabled) lvt |= LvtMasked; // §10.4.7.2: cannot be unmasked while software disabled
        if (reg == LvtTimer) TimerModeChanging(old, lvt);
        SetReg(reg, lvt);
        if (reg is LvtLint0 or LvtLint1) OnLint(reg == LvtLint0 ? 0 : 1, rising: false); // a held level now unmasked
        return true;
    }

    /// <summary>Sends what the ICR holds (§10.6.1, valid combinations per Table 10-3).</summary>
    private void SendIcr(uint low, uint destination)
    {
        var vector = (byte)low;
        var mode = (DeliveryMode)((low >> 8) & 0b111);
        var shorthand = (Shorthand)((low >> IcrShorthandShift) & 0b11);
        var level = (low & IcrLevelAssert) != 0;
        var trigger = (low & IcrTriggerLevel) != 0 ? TriggerMode.Level : TriggerMode.Edge;
        if ((byte)mode == 0b011 || mode == DeliveryMode.ExtInt) return; // reserved in the ICR
        if (mode is DeliveryMode.Fixed or DeliveryMode.LowestPriority or DeliveryMode.Nmi && trigger == TriggerMode.Level)
        {
            if (!level) return; // Table 10-3 note 2: ignored with Level=0, edge-triggered with Level=1
            trigger = TriggerMode.Edge;
        }
        if (mode is DeliveryMode.Fixed or DeliveryMode.LowestPriority && vector < 16)
        {
            SetError(ApicError.SendIllegalVector); // §10.5.3: not sent
            return;
        }
        if (shorthand == Shorthand.Self)
        {
            // Only fixed is defined with the self shorthand (Table 10-3); it never leaves the APIC.
            if (mode == DeliveryMode.Fixed) Accept(vector, level: true, TriggerMode.Edge);
            return;
        }
        var destMode = (low & IcrDestLogical) != 0 ? DestinationMode.Logical : DestinationMode.Physical;
        _events.SendIpi(new Ipi((int)_id, vector, mode, destMode, level, trigger, shorthand, destination));
    }

    /// <summary>
    /// Raises a local interrupt from an LVT entry (bhyve's vlapic_fire_lvt). Timer and error
    /// entries are always fixed; INIT and ExtINT exist only on the LINT entries. A fixed entry
    /// with an illegal vector sets "received illegal vector" (§10.5.3). Returns whether it fired.
    /// </summary>
    private bool FireLvt(int reg)
    {
        var lvt = Reg(reg);
        if ((lvt & LvtMasked) != 0) return false;
        var isLint = reg is LvtLint0 or LvtLint1;
        var mode = reg is LvtTimer or LvtError ? DeliveryMode.Fixed : (DeliveryMode)((lvt >> 8) & 0b111);
        switch (mode)
        {
            case DeliveryMode.Fixed:
                var vector = (byte)lvt;
                if (vector < 16)
                {
                    // The error LVT reporting its own illegal vector would recurse (bhyve guards the same way).
                    SetError(ApicError.ReceivedIllegalVector, fromErrorLvt: reg == LvtError);
                    return false;
                }
                var levelTriggered = isLint && (lvt & LvtTriggerLevel) != 0;
                SetIrr(vector, levelTriggered ? TriggerMode.Level : TriggerMode.Edge);
                if (levelTriggered) SetReg(reg, lvt | LvtRemoteIrr);
                return true;
            case DeliveryMode.Nmi:
                _events.VcpuEvent(VcpuEventKind.Nmi, 0);
                return true;
            case DeliveryMode.Smi:
                _events.VcpuEvent(VcpuEventKind.Smi, 0);
                return true;
            case DeliveryMode.Init when isLint:
                InitReset();
                _events.VcpuEvent(VcpuEventKind.Init, 0);
                return true;
            case DeliveryMode.ExtInt when isLint:
                _events.VcpuEvent(VcpuEventKind.ExtInt, 0);
                return true;
            default:
                return false;
        }
    }

    private static int LintRegister(int pin) => pin == 0 ? LvtLint0 : LvtLint1;

    private void SetLint(int pin, bool high)
    {
        var rising = high && !_lintLevel[pin];
        _lintLevel[pin] = high;
        if (high) OnLint(pin, rising);
    }

    /// <summary>
    /// A LINT pin is high (rising: it just went high). §10.5.1: NMI, SMI and INIT are
    /// edge-sensitive; ExtINT is level-sensitive (every assertion asks for an INTA); fixed follows
    /// the entry's trigger mode, level-triggered entries waiting for Remote IRR to clear (on EOI).
    /// </summary>
    private void OnLint(int pin, bool rising)
    {
        if (!_lintLevel[pin]) return;
        if (Mode == ApicMode.Disabled)
        {
            // §10.4.3: without an APIC, LINT0 is the processor's INTR pin and LINT1 its NMI pin.
            if (pin == 0) _events.VcpuEvent(VcpuEventKind.ExtInt, 0);
            else if (rising) _events.VcpuEvent(VcpuEventKind.Nmi, 0);
            return;
        }
        var reg = LintRegister(pin);
        var lvt = Reg(reg);
        var fire = (DeliveryMode)((lvt >> 8) & 0b111) switch
        {
            DeliveryMode.ExtInt => true,
            DeliveryMode.Fixed when (lvt & LvtTriggerLevel) != 0 => (lvt & LvtRemoteIrr) == 0,
            _ => rising,
        };
        if (fire) FireLvt(reg);
    }

    private void SetError(ApicError error, bool fromErrorLvt = false)
    {
        _esrPending |= (uint)error;
        if (!fromErrorLvt) FireLvt(LvtError);
    }

    private void SetIrr(byte vector, TriggerMode trigger)
    {
        SetBit(Irr, vector, true);
        SetBit(Tmr, vector, trigger == TriggerMode.Level); // §10.8.4: set for level, cleared for edge
    }

    /// <summary>The TPR (§10.8.3.1), as the guest's CR8 sees it too (CR8 = TPR[7:4] in 64-bit mode).</summary>
    public byte TaskPriority
    {
        get => (byte)Reg(Tpr);
        set
        {
            SetReg(Tpr, value);
            UpdatePpr();
        }
    }

    /// <summary>§10.8.3.1: PPR = TPR if TPR[7:4] ≥ ISRV[7:4], else ISRV[7:4]:0000b.</summary>
    private void UpdatePpr()
    {
        var tpr = Reg(Tpr) & 0xFF;
        var isrv = (uint)Math.Max(HighestBit(Isr), 0);
        SetReg(Ppr, (tpr & 0xF0) >= (isrv & 0xF0) ? tpr : isrv & 0xF0);
    }

    /// <summary>Power-up state (§10.4.7.1) in the current mode, keeping ID, base and LINT levels.</summary>
    private void ResetRegisters()
    {
        Array.Clear(_page);
        SetReg(Id, Mode == ApicMode.X2Apic ? _id : _id << 24);
        SetReg(ApicOffsets.Version, VersionValue);
        SetReg(Dfr, 0xFFFF_FFFF);
        SetReg(Svr, 0xFF);
        foreach (var lvt in LvtRegisters) SetReg(lvt, LvtMasked);
        if (_options.BspLint0ExtInt && (_apicBase & BaseBsp) != 0) SetReg(LvtLint0, (uint)DeliveryMode.ExtInt << 8);
        if (Mode == ApicMode.X2Apic) SetReg(Ldr, X2ApicLdr(_id));
        _esrPending = 0;
        _timerArmed = false;
        _timerStart = TimeSpan.Zero;
        _timerOffset = 0;
        _timerPeriods = 0;
        _tscDeadline = 0;
    }

    private uint Reg(int offset) => BinaryPrimitives.ReadUInt32LittleEndian(_page.AsSpan(offset, 4));

    private void SetReg(int offset, uint value) => BinaryPrimitives.WriteUInt32LittleEndian(_page.AsSpan(offset, 4), value);

    private bool TestBit(int bitmap, int vector) => (Reg(VectorRegister(bitmap, vector)) & (1u << (vector & 31))) != 0;

    private void SetBit(int bitmap, int vector, bool set)
    {
        var reg = VectorRegister(bitmap, vector);
        var bit = 1u << (vector & 31);
        SetReg(reg, set ? Reg(reg) | bit : Reg(reg) & ~bit);
    }

    /// <summary>The highest vector set in an ISR/TMR/IRR bitmap, or -1.</summary>
    private int HighestBit(int bitmap)
    {
        for (var i = 7; i >= 0; i--)
        {
            var word = Reg(bitmap + i * 0x10);
            if (word != 0) return i * 32 + 31 - System.Numerics.BitOperations.LeadingZeroCount(word);
        }
        return -1;
    }
}
