namespace ActorVmm.Devices;

/// <summary>
/// Snapshot of one 8259A. <see cref="Irr"/>, <see cref="Imr"/> and <see cref="Isr"/> are the
/// registers; <see cref="InputLevels"/> the current level of each IR input (for the master, bit 2
/// is the slave's INT); <see cref="HighestPriority"/> the IR level that has the highest priority
/// (0 after initialisation; rotation moves it); <see cref="InitStep"/> the
/// ICW expected next (0 = initialised, 1 = ICW2, 2 = ICW3, 3 = ICW4).
/// </summary>
public sealed record PicChipState(
    byte Irr,
    byte Imr,
    byte Isr,
    byte InputLevels,
    byte Elcr,
    byte VectorBase,
    byte HighestPriority,
    byte InitStep,
    byte Icw3,
    bool ExpectIcw4,
    bool Single,
    bool LevelTriggeredMode,
    bool AutoEoi,
    bool RotateOnAutoEoi,
    bool SpecialFullyNested,
    bool SpecialMask,
    bool ReadIsr,
    bool Poll);

/// <summary>Snapshot of a <see cref="Pic8259Pair"/>; <see cref="Intr"/> is the level of the INTR output.</summary>
public sealed record PicState(PicChipState Master, PicChipState Slave, bool Intr);

/// <summary>
/// The two cascaded 8259A programmable interrupt controllers of a PC (Intel 8259A datasheet,
/// "DS" below) plus the PIIX/ICH edge/level control registers (ELCR). Three bus views:
/// <see cref="Master"/> (ports 0x20–0x21), <see cref="Slave"/> (0xA0–0xA1) and <see cref="Elcr"/>
/// (0x4D0–0x4D1), all offsets relative to their base. The slave's INT drives the master's IR2.
///
/// Inputs: <see cref="Irq"/>(n) for n = 0–15 except 2 (the cascade). In edge mode a request is
/// latched in IRR on the rising edge and stays there until acknowledged, even if the line drops
/// first (as QEMU does; DS says it would become a default IR7, which would make every
/// <see cref="IInterruptLine.Pulse"/> spurious). In level mode (ELCR bit, or ICW1 LTIM for a whole
/// chip) IRR follows the line. Output: <c>intr</c>, a level, asserted while the master has an
/// unmasked request of higher priority than the one in service; told only on changes.
///
/// INTA is <see cref="Acknowledge"/>. Only 8086 mode is modelled (ICW4 µPM = 0 is treated as 1)
/// and buffered mode is ignored. OCW2 rotation, specific EOI, set-priority, OCW3 special mask
/// and poll are implemented.
///
/// The three views are separate bus windows that may be served by separate actors, and the IRQ
/// inputs come from other devices: every entry point takes one lock. The output line is told
/// under that lock, so it must not call back into this pair (lines must be cheap and not block).
/// </summary>
public sealed class Pic8259Pair
{
    public const ulong Length = 2;
    public const ulong ElcrLength = 2;
    public const int CascadeIrq = 2;

    /// <summary>IRQ 0, 1, 2 (master) and 8, 13 (slave) are always edge (PIIX4 datasheet §4.1.15).</summary>
    private const byte MasterElcrMask = 0b1111_1000;
    private const byte SlaveElcrMask = 0b1101_1110;

    private readonly object _sync = new();
    private readonly IInterruptLine _intr;
    private readonly Chip _master = new(isMaster: true);
    private readonly Chip _slave = new(isMaster: false);
    private readonly LevelInput[] _lines = new LevelInput[16];
    private bool _intrLevel;

    public Pic8259Pair(IInterruptLine intr)
    {
        _intr = intr;
        for (var i = 0; i < _lines.Length; i++)
        {
            var irq = i;
            _lines[i] = new LevelInput(high => SetIrq(irq, high));
        }
        Master = new ChipPort(this, _master);
        Slave = new ChipPort(this, _slave);
        Elcr = new ElcrPort(this);
    }

    /// <summary>Command (offset 0) and data (offset 1) ports of the master, 0x20–0x21.</summary>
    public IBusDevice Master { get; }

    /// <summary>Command (offset 0) and data (offset 1) ports of the slave, 0xA0–0xA1.</summary>
    public IBusDevice Slave { get; }

    /// <summary>ELCR1 (offset 0, IRQ 0–7) and ELCR2 (offset 1, IRQ 8–15), 0x4D0–0x4D1.</summary>
    public IBusDevice Elcr { get; }

    /// <summary>The level of INTR: the pair has an interrupt for the CPU.</summary>
    public bool InterruptRequested
    {
        get { lock (_sync) return _intrLevel; }
    }

    /// <summary>The input of ISA IRQ <paramref name="n"/>; IRQ 2 is the cascade and has no input.</summary>
    public IInterruptLine Irq(int n)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(n);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(n, 16);
        if (n == CascadeIrq) throw new ArgumentOutOfRangeException(nameof(n), "IRQ 2 is the cascade input of the master, driven by the slave");
        return _lines[n];
    }

    /// <summary>
    /// The INTA cycle (DS "Interrupt Sequence"): returns the vector of the highest-priority
    /// request, moves it from IRR to ISR (not in auto-EOI mode), and for IRQ 2 asks the slave for
    /// the vector. With no request left (it was withdrawn) the answer is the default IR7 vector
    /// and no ISR bit is set: a spurious IRQ 7, or IRQ 15 if the slave has lost its request.
    /// Returns null only while the master is between ICW1 and its last ICW (no vector base).
    /// </summary>
    public int? Acknowledge()
    {
        lock (_sync)
        {
            if (_master.InitStep != 0) return null;
            var irq = _master.Requested();
            int vector;
            if (irq < 0)
            {
                vector = _master.VectorBase + 7;
            }
            else
            {
                if (irq == CascadeIrq && !_master.Single)
                {
                    var slaveIrq = _slave.Requested();
                    if (slaveIrq >= 0) _slave.Accept(slaveIrq);
                    vector = _slave.VectorBase + (slaveIrq >= 0 ? slaveIrq : 7);
                }
                else
                {
                    vector = _master.VectorBase + irq;
                }
                _master.Accept(irq);
            }
            Update();
            return vector;
        }
    }

    public PicState State()
    {
        lock (_sync) return new PicState(_master.State(), _slave.State(), _intrLevel);
    }

    /// <summary>Rebuilds the pair from a snapshot and drives <paramref name="intr"/> to the level it implies.</summary>
    public static Pic8259Pair FromState(PicState state, IInterruptLine intr)
    {
        var pair = new Pic8259Pair(intr);
        pair._master.Restore(state.Master);
        pair._slave.Restore(state.Slave);
        pair._intrLevel = pair._master.Requested() >= 0;
        if (pair._intrLevel) intr.Assert();
        else intr.Deassert();
        return pair;
    }

    private void SetIrq(int irq, bool level)
    {
        lock (_sync)
        {
            if (irq < 8) _master.SetInput(irq, level);
            else _slave.SetInput(irq - 8, level);
            Update();
        }
    }

    /// <summary>Propagates the slave's INT to the master's IR2, then the master's to INTR.</summary>
    private void Update()
    {
        _master.SetInput(CascadeIrq, _slave.Requested() >= 0);
        var level = _master.Requested() >= 0;
        if (level == _intrLevel) return;
        _intrLevel = level;
        if (level) _intr.Assert();
        else _intr.Deassert();
    }

    /// <summary>One 8259A.</summary>
    private sealed class Chip(bool isMaster)
    {
        // ICW1 (command port, bit 4 set).
        private const byte Icw1Select = 0b0001_0000;
        private const byte Icw1Ic4 = 0b0000_0001;
        private const byte Icw1Single = 0b0000_0010;
        private const byte Icw1Ltim = 0b0000_1000;

        // ICW4.
        private const byte Icw4AutoEoi = 0b0000_0010;
        private const byte Icw4Sfnm = 0b0001_0000;

        // OCW2/OCW3 (command port, bit 4 clear; bit 3 selects OCW3).
        private const byte Ocw3Select = 0b0000_1000;
        private const byte Ocw2LevelMask = 0b0000_0111;
        private const byte Ocw3ReadRegister = 0b0000_0010; // RR
        private const byte Ocw3ReadIsr = 0b0000_0001;      // RIS
        private const byte Ocw3Poll = 0b0000_0100;
        private const byte Ocw3SetSmm = 0b0110_0000;       // ESMM + SMM
        private const byte Ocw3Esmm = 0b0100_0000;

        private readonly byte _elcrMask = isMaster ? MasterElcrMask : SlaveElcrMask;

        private byte _irr;
        private byte _imr;
        private byte _isr;
        private byte _levels;
        private byte _elcr;
        private byte _priorityAdd;
        private byte _icw3 = isMaster ? (byte)(1 << CascadeIrq) : (byte)CascadeIrq;
        private bool _expectIcw4;
        private bool _ltim;
        private bool _autoEoi;
        private bool _rotateOnAutoEoi;
        private bool _sfnm;
        private bool _specialMask;
        private bool _readIsr;
        private bool _poll;

        public byte VectorBase { get; private set; }
        public int InitStep { get; private set; }
        public bool Single { get; private set; }
        public byte Elcr => _elcr;

        private byte LevelMask => _ltim ? (byte)0xFF : _elcr;

        public void SetInput(int irq, bool level)
        {
            var bit = (byte)(1 << irq);
            var was = (_levels & bit) != 0;
            if (level) _levels |= bit;
            else _levels &= (byte)~bit;

            if ((LevelMask & bit) != 0)
            {
                if (level) _irr |= bit;
                else _irr &= (byte)~bit;
            }
            else if (level && !was)
            {
                _irr |= bit;
            }
        }

        public void WriteElcr(byte value)
        {
            var old = LevelMask;
            _elcr = (byte)(value & _elcrMask);
            ModeChanged(old);
        }

        /// <summary>
        /// The IR level to signal, or -1: the highest-priority unmasked request, if it beats the
        /// highest priority in service (DS "Fully Nested Mode"; QEMU's pic_get_irq).
        /// </summary>
        public int Requested()
        {
            var priority = Priority((byte)(_irr & ~_imr));
            if (priority == 8) return -1;
            var inService = _isr;
            if (_specialMask) inService &= (byte)~_imr; // DS "Special Mask Mode"
            // DS "Special Fully Nested Mode": the master lets a higher slave request through.
            if (_sfnm && isMaster) inService &= unchecked((byte)~(1 << CascadeIrq));
            return priority < Priority(inService) ? (priority + _priorityAdd) & 7 : -1;
        }

        /// <summary>The INTA for <paramref name="irq"/>: IRR to ISR (or rotation only, in auto-EOI).</summary>
        public void Accept(int irq)
        {
            var bit = (byte)(1 << irq);
            if (_autoEoi)
            {
                if (_rotateOnAutoEoi) _priorityAdd = (byte)((irq + 1) & 7);
            }
            else
            {
                _isr |= bit;
            }
            // A level request stays in IRR while its line is high.
            if ((LevelMask & bit) == 0) _irr &= (byte)~bit;
        }

        public byte ReadCommand()
        {
            if (_poll)
            {
                // DS "The Poll Command": the read is the acknowledge; bit 7 = interrupt, 2:0 = level.
                _poll = false;
                var irq = Requested();
                if (irq < 0) return 0;
                Accept(irq);
                return (byte)(0x80 | irq);
            }
            return _readIsr ? _isr : _irr;
        }

        public byte ReadData() => _imr;

        public void WriteCommand(byte value)
        {
            if ((value & Icw1Select) != 0) Icw1(value);
            else if ((value & Ocw3Select) != 0) Ocw3(value);
            else Ocw2(value);
        }

        public void WriteData(byte value)
        {
            switch (InitStep)
            {
                case 0: // OCW1
                    _imr = value;
                    break;
                case 1: // ICW2: T7–T3 of the vector (8086 mode)
                    VectorBase = (byte)(value & 0xF8);
                    InitStep = Single ? NextAfterIcw3() : 2;
                    break;
                case 2: // ICW3: slaves on the master's IRs / the slave's ID; the PC wiring is fixed
                    _icw3 = value;
                    InitStep = NextAfterIcw3();
                    break;
                case 3: // ICW4
                    _autoEoi = (value & Icw4AutoEoi) != 0;
                    _sfnm = (value & Icw4Sfnm) != 0;
                    InitStep = 0;
                    break;
            }
        }

        public PicChipState State() => new(
            _irr, _imr, _isr, _levels, _elcr, VectorBase, _priorityAdd, (byte)InitStep, _icw3, _expectIcw4,
            Single, _ltim, _autoEoi, _rotateOnAutoEoi, _sfnm, _specialMask, _readIsr, _poll);

        public void Restore(PicChipState s)
        {
            _irr = s.Irr;
            _imr = s.Imr;
            _isr = s.Isr;
            _levels = s.InputLevels;
            _elcr = (byte)(s.Elcr & _elcrMask);
            VectorBase = (byte)(s.VectorBase & 0xF8);
            _priorityAdd = (byte)(s.HighestPriority & 7);
            InitStep = s.InitStep <= 3 ? s.InitStep : 0;
            _icw3 = s.Icw3;
            _expectIcw4 = s.ExpectIcw4;
            Single = s.Single;
            _ltim = s.LevelTriggeredMode;
            _autoEoi = s.AutoEoi;
            _rotateOnAutoEoi = s.RotateOnAutoEoi;
            _sfnm = s.SpecialFullyNested;
            _specialMask = s.SpecialMask;
            _readIsr = s.ReadIsr;
            _poll = s.Poll;
        }

        private int NextAfterIcw3() => _expectIcw4 ? 3 : 0;

        /// <summary>DS "Initialization Command Word 1": starts the sequence and resets the chip.</summary>
        private void Icw1(byte value)
        {
            _expectIcw4 = (value & Icw1Ic4) != 0;
            Single = (value & Icw1Single) != 0;
            _ltim = (value & Icw1Ltim) != 0;
            // a. the edge sense circuit is reset: an edge input needs a new low-to-high transition;
            //    a level input still high keeps requesting.
            _irr = (byte)(_levels & LevelMask);
            // b. IMR cleared; c. IR7 lowest priority; e. special mask off, status read = IRR;
            // f. ICW4 functions zero until ICW4 says otherwise.
            _imr = 0;
            _isr = 0;
            _priorityAdd = 0;
            _specialMask = false;
            _readIsr = false;
            _poll = false;
            _autoEoi = false;
            _rotateOnAutoEoi = false;
            _sfnm = false;
            InitStep = 1;
        }

        /// <summary>OCW2 (DS Figure 8): R, SL, EOI in bits 7:5, level in 2:0.</summary>
        private void Ocw2(byte value)
        {
            var level = value & Ocw2LevelMask;
            switch (value >> 5)
            {
                case 0b001: // non-specific EOI
                    NonSpecificEoi(rotate: false);
                    break;
                case 0b011: // specific EOI
                    _isr &= (byte)~(1 << level);
                    break;
                case 0b101: // rotate on non-specific EOI
                    NonSpecificEoi(rotate: true);
                    break;
                case 0b100: // set rotate in automatic EOI mode
                    _rotateOnAutoEoi = true;
                    break;
                case 0b000: // clear rotate in automatic EOI mode
                    _rotateOnAutoEoi = false;
                    break;
                case 0b111: // rotate on specific EOI
                    _isr &= (byte)~(1 << level);
                    _priorityAdd = (byte)((level + 1) & 7);
                    break;
                case 0b110: // set priority: level becomes the lowest
                    _priorityAdd = (byte)((level + 1) & 7);
                    break;
                default: // 0b010: no operation
                    break;
            }
        }

        /// <summary>Clears the highest-priority ISR bit (DS "End of Interrupt").</summary>
        private void NonSpecificEoi(bool rotate)
        {
            var priority = Priority(_isr);
            if (priority == 8) return;
            var irq = (priority + _priorityAdd) & 7;
            _isr &= (byte)~(1 << irq);
            if (rotate) _priorityAdd = (byte)((irq + 1) & 7);
        }

        /// <summary>OCW3 (DS Figure 8): special mask, poll, read register select.</summary>
        private void Ocw3(byte value)
        {
            if ((value & Ocw3Poll) != 0) _poll = true;
            if ((value & Ocw3ReadRegister) != 0) _readIsr = (value & Ocw3ReadIsr) != 0;
            if ((value & Ocw3Esmm) != 0) _specialMask = (value & Ocw3SetSmm) == Ocw3SetSmm;
        }

        private void ModeChanged(byte oldMask)
        {
            var mask = LevelMask;
            var nowLevel = (byte)(mask & ~oldMask);
            var nowEdge = (byte)(oldMask & ~mask);
            // A line switched to level requests while high; one switched to edge needs a new edge.
            _irr = (byte)((_irr & ~nowLevel & ~nowEdge) | (_levels & nowLevel));
        }

        /// <summary>0 for the highest current priority .. 7 for the lowest, 8 if no bit is set.</summary>
        private int Priority(byte mask)
        {
            if (mask == 0) return 8;
            var priority = 0;
            while ((mask & (1 << ((priority + _priorityAdd) & 7))) == 0) priority++;
            return priority;
        }
    }

    private sealed class ChipPort(Pic8259Pair pair, Chip chip) : IBusDevice
    {
        public ulong Read(ulong offset, int size)
        {
            lock (pair._sync)
            {
                switch (offset)
                {
                    case 0:
                        var value = chip.ReadCommand(); // a poll read acknowledges
                        pair.Update();
                        return value;
                    case 1:
                        return chip.ReadData();
                    default:
                        return 0xFF;
                }
            }
        }

        public void Write(ulong offset, int size, ulong value)
        {
            lock (pair._sync)
            {
                switch (offset)
                {
                    case 0:
                        chip.WriteCommand((byte)value);
                        break;
                    case 1:
                        chip.WriteData((byte)value);
                        break;
                    default:
                        return;
                }
                pair.Update();
            }
        }
    }

    /// <summary>ELCR1/ELCR2: bit n = 1 makes IRQ n level-triggered. A 16-bit access covers both.</summary>
    private sealed class ElcrPort(Pic8259Pair pair) : IBusDevice
    {
        public ulong Read(ulong offset, int size)
        {
            lock (pair._sync)
            {
                return offset switch
                {
                    0 => pair._master.Elcr | (size >= 2 ? (ulong)pair._slave.Elcr << 8 : 0),
                    1 => pair._slave.Elcr,
                    _ => 0xFF,
                };
            }
        }

        public void Write(ulong offset, int size, ulong value)
        {
            lock (pair._sync)
            {
                switch (offset)
                {
                    case 0:
                        pair._master.WriteElcr((byte)value);
                        if (size >= 2) pair._slave.WriteElcr((byte)(value >> 8));
                        break;
                    case 1:
                        pair._slave.WriteElcr((byte)value);
                        break;
                    default:
                        return;
                }
                pair.Update();
            }
        }
    }
}
