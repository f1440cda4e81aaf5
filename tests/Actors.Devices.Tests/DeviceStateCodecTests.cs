using System.Collections.Immutable;
using System.Text;

namespace ActorVmm.Devices.Tests;

/// <summary>An interrupt line that records every call in order.</summary>
internal sealed class TraceLine : IInterruptLine
{
    public List<string> Events { get; } = [];
    public void Assert() => Events.Add("assert");
    public void Deassert() => Events.Add("deassert");
    public void Pulse() => Events.Add("pulse");
}

/// <summary>Records what reaches the APIC bus.</summary>
internal sealed class TraceBus : IApicBus
{
    public List<ApicMessage> Messages { get; } = [];
    public void Deliver(ApicMessage m) => Messages.Add(m);
}

/// <summary>
/// Every device state record survives a snapshot: a busy model (armed timers, queued bytes, pending
/// and in-service interrupts) is saved, encoded, decoded and restored, and the restored model then
/// does exactly what the original does under the same accesses and the same passage of time.
/// </summary>
public sealed class DeviceStateCodecTests
{
    /// <summary>Encodes and decodes <paramref name="state"/>, checking the decoded record equals it.</summary>
    private static T ThroughSnapshot<T>(T state) where T : notnull
    {
        var json = DeviceStateCodec.Encode(state);
        var decoded = DeviceStateCodec.Decode(json);
        var typed = Assert.IsType<T>(decoded);
        Assert.Equal(state, typed);
        return typed;
    }

    private static byte[] Utf8(string s) => Encoding.UTF8.GetBytes(s);

    // ---------------------------------------------------------------- UART

    [Fact]
    public void Uart_restored_from_a_snapshot_delivers_its_queued_bytes_and_pending_interrupts()
    {
        var line = new TraceLine();
        var output = new List<byte>();
        var uart = new Uart16550(line, output.Add);
        uart.Write(3, 1, 0x83); // DLAB
        uart.Write(0, 1, 0x0C); // 9600 baud
        uart.Write(3, 1, 0x03); // 8N1
        uart.Write(2, 1, 0x81); // FIFO on, trigger 8
        uart.Write(4, 1, 0x0B); // DTR, RTS, OUT2
        uart.Write(1, 1, 0x07); // RDA, THRE, RLS interrupts
        uart.Write(7, 1, 0x5A);
        Assert.Equal(5, uart.OfferInput("hello"u8));
        var state = ThroughSnapshot(uart.State());

        var restoredLine = new TraceLine();
        var restoredOutput = new List<byte>();
        var restored = Uart16550.FromState(state, restoredLine, restoredOutput.Add);
        Assert.Equal(["assert"], restoredLine.Events); // RDA/THRE pending behind OUT2
        restoredLine.Events.Clear();
        line.Events.Clear();
        Assert.Equal(uart.State(), restored.State());

        ulong[] Script(Uart16550 u) =>
        [
            u.Read(2, 1), u.Read(5, 1), u.Read(7, 1),
            .. Enumerable.Range(0, 6).Select(_ => u.Read(0, 1)), // five bytes, then the last one again
            u.Read(2, 1), u.Read(5, 1),
            Write(u, 0, (byte)'!'), u.Read(2, 1), u.Read(2, 1),
            (ulong)u.OfferInput("0123456789ABCDEFGHIJ"u8), u.Read(2, 1), u.Read(5, 1),
        ];
        Assert.Equal(Script(uart), Script(restored));
        Assert.Equal(line.Events, restoredLine.Events);
        Assert.Equal("!"u8.ToArray(), restoredOutput);
        Assert.Equal(uart.State(), restored.State());
    }

    private static ulong Write(IBusDevice d, ulong offset, byte value)
    {
        d.Write(offset, 1, value);
        return value;
    }

    // ---------------------------------------------------------------- i8042

    [Fact]
    public void I8042_restored_from_a_snapshot_keeps_its_reply_and_its_pending_command()
    {
        var events = new RecordingEvents();
        var kbc = new I8042(events);
        kbc.Write(I8042.CommandOffset, 1, 0x60); // write command byte: waits for its data byte
        kbc.Write(I8042.DataOffset, 1, 0x45);
        kbc.Write(I8042.CommandOffset, 1, 0xAA); // self test: 0x55 in the output buffer
        kbc.Write(I8042.CommandOffset, 1, 0xD1); // write output port: pending
        var state = ThroughSnapshot(kbc.State());

        var restoredEvents = new RecordingEvents();
        var restored = I8042.FromState(state, restoredEvents);

        ulong[] Script(I8042 k) =>
        [
            k.Read(I8042.CommandOffset, 1), k.Read(I8042.DataOffset, 1), k.Read(I8042.CommandOffset, 1),
            Write(k, I8042.DataOffset, 0xCE), // the pending command takes it: reset line low
            Write(k, I8042.CommandOffset, 0x20), k.Read(I8042.DataOffset, 1),
        ];
        Assert.Equal(Script(kbc), Script(restored));
        Assert.Single(restoredEvents.Resets);
        Assert.Equal(events.Resets, restoredEvents.Resets);
    }

    // ---------------------------------------------------------------- IOAPIC

    private static void Rte(IoApic ioapic, int pin, ulong entry)
    {
        ioapic.Write(IoApic.RegisterSelectOffset, 4, (ulong)(0x10 + 2 * pin));
        ioapic.Write(IoApic.WindowOffset, 4, entry & 0xFFFF_FFFF);
        ioapic.Write(IoApic.RegisterSelectOffset, 4, (ulong)(0x11 + 2 * pin));
        ioapic.Write(IoApic.WindowOffset, 4, entry >> 32);
    }

    [Fact]
    public void IoApic_restored_from_a_snapshot_keeps_a_level_interrupt_in_service_until_its_eoi()
    {
        var bus = new TraceBus();
        var ioapic = new IoApic(bus, id: 2);
        Rte(ioapic, 4, 0x31);                                   // edge, fixed, APIC 0
        Rte(ioapic, 9, 0x39 | 1UL << 15);                       // level, high active
        Rte(ioapic, 10, 0x3A | 1UL << 16);                      // masked
        ioapic.Pin(9).Assert();                              // delivered: remote IRR set
        ioapic.Pin(10).Assert();
        ioapic.Write(IoApic.RegisterSelectOffset, 4, 0x12);
        var state = ThroughSnapshot(ioapic.State());
        Assert.Single(bus.Messages);
        bus.Messages.Clear();

        var restoredBus = new TraceBus();
        var restored = IoApic.FromState(state, restoredBus);
        Assert.Empty(restoredBus.Messages); // nothing is delivered again by restoring

        ulong[] Script(IoApic io) =>
        [
            io.Read(IoApic.WindowOffset, 4),
            AssertPin(io, 9), // still in service: no delivery
            EndOfInterrupt(io, 0x39), // the pin is still active: delivered again
            Pulse(io, 4),
            Unmask(io, 10), // an active level pin delivers on unmask
        ];
        Assert.Equal(Script(ioapic), Script(restored));
        Assert.Equal(3, restoredBus.Messages.Count);
        Assert.Equal(bus.Messages, restoredBus.Messages);

        static ulong AssertPin(IoApic io, int pin)
        {
            io.Pin(pin).Assert();
            return 0;
        }

        static ulong EndOfInterrupt(IoApic io, byte vector)
        {
            io.EndOfInterrupt(vector);
            return 1;
        }

        static ulong Pulse(IoApic io, int pin)
        {
            io.Pin(pin).Pulse();
            return 2;
        }

        static ulong Unmask(IoApic io, int pin)
        {
            Rte(io, pin, 0x3A | 1UL << 15);
            return 3;
        }
    }

    // ---------------------------------------------------------------- 8259 pair

    [Fact]
    public void Pic_restored_from_a_snapshot_keeps_requests_in_service_and_pending()
    {
        var intr = new TraceLine();
        var pic = new PicDevice(intr).InitialiseLikeBios();
        pic.Write(PicDevice.MasterWindow + 1, 1, 0b1111_1000); // IRQ 0, 1, 2 (cascade) unmasked
        pic.Write(PicDevice.SlaveWindow + 1, 1, 0b1111_1110);  // IRQ 8 unmasked
        pic.Input(1)!.Pulse();
        Assert.Equal(0x09, pic.Acknowledge());                 // IRQ 1 in service
        pic.Input(8)!.Pulse();                                 // pending on the slave
        pic.Input(0)!.Pulse();                                 // pending, outranks IRQ 1
        var state = ThroughSnapshot((PicState)pic.SaveState());

        var restoredIntr = new TraceLine();
        var restored = PicDevice.FromState(state, restoredIntr);
        Assert.Equal(["assert"], restoredIntr.Events);
        intr.Events.Clear();
        restoredIntr.Events.Clear();

        ulong?[] Script(PicDevice p) =>
        [
            (ulong?)p.Acknowledge(),                                // IRQ 0
            Write(p, PicDevice.MasterWindow, 0x20), (ulong?)p.Acknowledge(), // EOI, then nothing above IRQ 1's level: spurious
            Write(p, PicDevice.MasterWindow, 0x20),                  // EOI IRQ 1
            (ulong?)p.Acknowledge(),                                 // the slave's IRQ 8
            Write(p, PicDevice.MasterWindow, 0x0B), p.Read(PicDevice.MasterWindow, 1), // ISR
            Write(p, PicDevice.SlaveWindow, 0x0B), p.Read(PicDevice.SlaveWindow, 1),
            p.Read(PicDevice.MasterWindow + 1, 1),                   // IMR
        ];
        var expected = Script(pic);
        Assert.Equal([0x08UL, 0x20, 0x0F, 0x20, 0x70, 0x0B, 0b0000_0100, 0x0B, 0b0000_0001, 0b1111_1000], expected); // 0x0F: spurious IRQ 7
        Assert.Equal(expected, Script(restored));
        Assert.Equal(intr.Events, restoredIntr.Events);
    }

    // ---------------------------------------------------------------- 8254 PIT

    [Fact]
    public void Pit_restored_from_a_snapshot_keeps_its_armed_timers_on_a_clock_that_continues()
    {
        var clock = new ManualClock { Now = TimeSpan.FromMilliseconds(3) };
        var irq0 = new TraceLine();
        var pit = new Pit8254(clock, irq0);
        pit.Write(3, 1, 0x34); // counter 0, lobyte/hibyte, mode 2
        pit.Write(0, 1, 1193 & 0xFF);
        pit.Write(0, 1, 1193 >> 8);
        pit.Write(3, 1, 0xB0); // counter 2, mode 0, one shot
        pit.Write(2, 1, 0x10);
        pit.Write(2, 1, 0x27);
        pit.SpeakerPort.Write(0, 1, 0x01); // gate 2 on
        clock.Advance(TimeSpan.FromMilliseconds(2.5));
        pit.OnDeadline();
        pit.Write(3, 1, 0x00); // latch counter 0: the latched count is part of the state
        var state = ThroughSnapshot(pit.State());

        // The restored VM's clock continues from the saved Now (MonotonicClock.StartingAt).
        var restoredClock = new ManualClock { Now = clock.Now };
        var restoredIrq0 = new TraceLine();
        var restored = Pit8254.FromState(state, restoredClock, restoredIrq0);
        irq0.Events.Clear();
        restoredIrq0.Events.Clear();
        Assert.Equal(pit.NextDeadline, restored.NextDeadline);

        var deadlines = new List<TimeSpan>();
        List<ulong> Script(Pit8254 p, ManualClock c, List<TimeSpan>? seen)
        {
            var reads = new List<ulong> { p.Read(0, 1), p.Read(0, 1) }; // the latched count
            for (var i = 0; i < 12 && p.NextDeadline is { } next; i++)
            {
                seen?.Add(next);
                c.Now = next;
                p.OnDeadline();
                p.Write(3, 1, 0x00);
                reads.Add(p.Read(0, 1) | p.Read(0, 1) << 8);
                reads.Add(p.SpeakerPort.Read(0, 1) & 0x20); // OUT2
            }
            return reads;
        }
        var expected = Script(pit, clock, deadlines);
        Assert.Equal(expected, Script(restored, restoredClock, null));
        Assert.Contains("pulse", irq0.Events);
        Assert.Equal(irq0.Events, restoredIrq0.Events);
        Assert.Equal(12, deadlines.Count);
    }

    // ---------------------------------------------------------------- CMOS RTC

    private static readonly DateTime Wall = new DateTime(2024, 3, 5, 13, 45, 30, DateTimeKind.Utc).AddMilliseconds(500);

    private static byte Cmos(CmosRtc rtc, byte index)
    {
        rtc.Write(CmosRtc.IndexOffset, 1, index);
        return (byte)rtc.Read(CmosRtc.DataOffset, 1);
    }

    private static void SetCmos(CmosRtc rtc, byte index, byte value)
    {
        rtc.Write(CmosRtc.IndexOffset, 1, index);
        rtc.Write(CmosRtc.DataOffset, 1, value);
    }

    /// <summary>A guest that sets the clock 2 h ahead of the host, with periodic (8 Hz), update and
    /// alarm interrupts enabled, and one interrupt raised and not yet handled.</summary>
    private static CmosRtc BusyRtc(ManualClock clock, IInterruptLine irq8)
    {
        var rtc = new CmosRtc(() => Wall, clock, irq8);
        SetCmos(rtc, CmosRtc.RegisterB, 0x82); // SET, 24 h, BCD
        SetCmos(rtc, CmosRtc.Hours, 0x15);     // 15:45:30 while the host says 13:45:30
        SetCmos(rtc, CmosRtc.RegisterB, 0x72); // run; PIE, AIE, UIE
        SetCmos(rtc, CmosRtc.RegisterA, 0x2D); // 8 Hz
        SetCmos(rtc, CmosRtc.SecondsAlarm, 0x34);
        SetCmos(rtc, CmosRtc.MinutesAlarm, 0xC0); // any minute
        SetCmos(rtc, CmosRtc.HoursAlarm, 0xC0);   // any hour
        SetCmos(rtc, 0x40, 0x99);                 // RAM
        rtc.Write(CmosRtc.IndexOffset, 1, 0x8C); // NMI disabled, register C selected
        clock.Advance(TimeSpan.FromSeconds(1));
        rtc.OnDeadline();
        return rtc;
    }

    /// <summary>Plays actor and guest: runs from deadline to deadline until <paramref name="end"/>,
    /// reading register C (the handler) whenever the line is up; returns what the guest read.</summary>
    private static List<(TimeSpan, byte, byte)> RunRtc(CmosRtc rtc, ManualClock clock, CountingInterruptLine line, TimeSpan end)
    {
        var seen = new List<(TimeSpan, byte, byte)>();
        if (line.Level) seen.Add((clock.Now, Cmos(rtc, CmosRtc.RegisterC), Cmos(rtc, CmosRtc.Seconds))); // raised before the save
        for (var guard = 0; guard < 10_000 && rtc.NextDeadline is { } deadline && deadline <= end; guard++)
        {
            clock.Now = deadline;
            rtc.OnDeadline();
            if (!line.Level) continue;
            seen.Add((clock.Now, Cmos(rtc, CmosRtc.RegisterC), Cmos(rtc, CmosRtc.Seconds)));
        }
        clock.Now = end;
        return seen;
    }

    [Fact]
    public void CmosRtc_restored_from_a_snapshot_raises_the_same_interrupts_at_the_same_times()
    {
        var clock = new ManualClock { Now = TimeSpan.FromSeconds(4) };
        var irq8 = new CountingInterruptLine();
        var rtc = BusyRtc(clock, irq8);
        Assert.True(irq8.Level); // a second went by: flags raised, not yet read
        var state = ThroughSnapshot(rtc.State());

        // Restored with the clock continuing from the saved Now and the host's wall clock as it is then.
        var restoredClock = new ManualClock { Now = clock.Now };
        var restoredIrq8 = new CountingInterruptLine();
        var restored = CmosRtc.FromState(state, () => Wall + (clock.Now - TimeSpan.FromSeconds(4)), restoredClock, restoredIrq8);
        Assert.True(restoredIrq8.Level);
        Assert.Equal(rtc.State(), restored.State());
        Assert.Equal(0x8CUL, restored.Read(CmosRtc.IndexOffset, 1));

        var end = clock.Now + TimeSpan.FromSeconds(5);
        var expected = RunRtc(rtc, clock, irq8, end);
        var actual = RunRtc(restored, restoredClock, restoredIrq8, end);
        Assert.True(expected.Count >= 40, $"{expected.Count} interrupts"); // 8 Hz for 5 s, plus update and alarm
        Assert.Contains(expected, e => (e.Item2 & 0x20) != 0); // the alarm at :34
        Assert.Equal(expected, actual);
        Assert.Equal(Cmos(rtc, CmosRtc.Hours), Cmos(restored, CmosRtc.Hours));
        Assert.Equal(0x99, Cmos(restored, 0x40));
    }

    [Fact]
    public void CmosRtc_restored_days_later_reads_the_hosts_time_with_the_offset_the_guest_set()
    {
        var clock = new ManualClock { Now = TimeSpan.FromSeconds(4) };
        var rtc = BusyRtc(clock, new CountingInterruptLine());
        var state = DeviceStateCodec.Decode(DeviceStateCodec.Encode(rtc.State()));

        // Three days and 10 minutes later, on a new host process whose clock continues from the saved Now.
        var hostNow = Wall.AddDays(3).AddMinutes(10);
        var restoredClock = new ManualClock { Now = clock.Now };
        var restored = CmosRtc.FromState((CmosRtcState)state, () => hostNow, restoredClock, new CountingInterruptLine());

        // 2024-03-08 15:55:30 (13:55:30 on the host + the guest's 2 h), a Friday.
        byte[] time = [Cmos(restored, CmosRtc.Seconds), Cmos(restored, CmosRtc.Minutes), Cmos(restored, CmosRtc.Hours),
            Cmos(restored, CmosRtc.DayOfWeek), Cmos(restored, CmosRtc.DayOfMonth), Cmos(restored, CmosRtc.Month),
            Cmos(restored, CmosRtc.Year), Cmos(restored, CmosRtc.Century)];
        Assert.Equal([0x30, 0x55, 0x15, 0x06, 0x08, 0x03, 0x24, 0x20], time);
    }

    [Fact]
    public void CmosRtc_stopped_by_the_guest_stays_at_the_time_it_wrote_after_a_restore()
    {
        var clock = new ManualClock();
        var rtc = new CmosRtc(() => Wall, clock, new CountingInterruptLine());
        SetCmos(rtc, CmosRtc.RegisterB, 0x82); // SET: the guest is writing the time
        SetCmos(rtc, CmosRtc.Minutes, 0x07);
        var state = DeviceStateCodec.Decode(DeviceStateCodec.Encode(rtc.State()));

        var restored = CmosRtc.FromState((CmosRtcState)state, () => Wall.AddDays(1), new ManualClock(), new CountingInterruptLine());

        Assert.Equal(0x07, Cmos(restored, CmosRtc.Minutes));
        Assert.Equal(0x13, Cmos(restored, CmosRtc.Hours));
        Assert.Equal(0x05, Cmos(restored, CmosRtc.DayOfMonth)); // not the host's new day: the clock is stopped
        SetCmos(restored, CmosRtc.RegisterB, 0x02); // the guest lets it run from what it wrote
        Assert.Equal(0x07, Cmos(restored, CmosRtc.Minutes));
    }

    // ---------------------------------------------------------------- ACPI PM

    [Fact]
    public void AcpiPm_restored_from_a_snapshot_keeps_its_timer_status_and_enables_on_a_clock_that_continues()
    {
        var clock = new ManualClock { Now = TimeSpan.FromSeconds(3) };
        var events = new RecordingEvents();
        var pm = new AcpiPm(clock, events);
        pm.Write(AcpiPm.EnableOffset, 2, 0x0121);
        pm.Write(AcpiPm.ControlOffset, 2, 5 << 10); // SLP_TYP 5 without SLP_EN
        pm.Write(AcpiPm.StatusOffset, 2, AcpiPm.TimerStatus); // clear TMR_STS now
        clock.Advance(TimeSpan.FromSeconds(1));
        var state = ThroughSnapshot(pm.State());

        var restoredClock = new ManualClock { Now = clock.Now };
        var restoredEvents = new RecordingEvents();
        var restored = AcpiPm.FromState(state, restoredClock, restoredEvents);

        ulong[] Script(AcpiPm p, ManualClock c)
        {
            var reads = new List<ulong> { p.Read(AcpiPm.StatusOffset, 2), p.Read(AcpiPm.TimerOffset, 4), p.Read(AcpiPm.EnableOffset, 2),
                p.Read(AcpiPm.ControlOffset, 2) };
            c.Advance(TimeSpan.FromSeconds(1.5)); // bit 23 of the timer flips (every 2.34 s)
            reads.Add(p.Read(AcpiPm.StatusOffset, 2));
            reads.Add(p.Read(AcpiPm.TimerOffset, 4));
            p.Write(AcpiPm.ControlOffset, 2, 1 << 13 | AcpiPm.SleepTypeS5 << 10);
            return [.. reads];
        }
        var expected = Script(pm, clock);
        Assert.Equal(0UL, expected[0] & AcpiPm.TimerStatus);
        Assert.Equal(1UL, expected[4] & AcpiPm.TimerStatus);
        Assert.Equal(expected, Script(restored, restoredClock));
        Assert.Single(restoredEvents.PowerOffs);
    }

    // ---------------------------------------------------------------- reset registers, pc-testdev

    [Fact]
    public void ResetControl_and_port92_restored_from_a_snapshot_keep_their_bits_and_reset_edges()
    {
        var events = new RecordingEvents();
        var cf9 = new ResetControl(events);
        cf9.Write(0, 1, 0x0A);
        var port92 = new SystemControlPortA(events);
        port92.Write(0, 1, 0x03); // A20 and the reset bit: that was the reset, the bit stays
        events.Resets.Clear();

        var restoredEvents = new RecordingEvents();
        var restoredCf9 = ResetControl.FromState(ThroughSnapshot(cf9.State()), restoredEvents);
        var restored92 = SystemControlPortA.FromState(ThroughSnapshot(port92.State()), restoredEvents);

        ulong[] Script(ResetControl c, SystemControlPortA p) =>
        [
            c.Read(0, 1), p.Read(0, 1),
            Write(p, 0, 0x03),               // bit 0 already 1: no new reset
            Write(p, 0, 0x02), Write(p, 0, 0x03), // 0 then 1: one reset
            Write(c, 0, 0x06), c.Read(0, 1),
        ];
        Assert.Equal(Script(cf9, port92), Script(restoredCf9, restored92));
        Assert.Equal(2, restoredEvents.Resets.Count);
        Assert.Equal(events.Resets, restoredEvents.Resets);
    }

    [Fact]
    public void PcTestDevice_restored_from_a_snapshot_keeps_its_scratch_register_and_mmio_ram()
    {
        IInterruptLine[] Lines() => [.. Enumerable.Range(0, PcTestDevice.Lines).Select(_ => new TraceLine())];
        var device = new PcTestDevice(new RecordingEvents(), Lines());
        device.Write(PcTestDevice.ScratchWindow, 4, 0xDEAD_BEEF);
        for (var i = 0UL; i < 64; i++) device.Write(PcTestDevice.IomemWindow + i * 1021, 8, 0x0102_0304_0506_0708 * (i + 1));
        var state = ThroughSnapshot(device.State());

        var restored = PcTestDevice.FromState(state, new RecordingEvents(), Lines());

        ulong[] Script(PcTestDevice d) =>
        [
            d.Read(PcTestDevice.ScratchWindow, 4), d.Read(PcTestDevice.ByteScratchWindow + 2, 1),
            .. Enumerable.Range(0, 64).Select(i => d.Read(PcTestDevice.IomemWindow + (ulong)i * 1021, 8)),
            d.Read(PcTestDevice.IomemWindow + 0xFFF8, 8),
        ];
        Assert.Equal(Script(device), Script(restored));
    }

    // ---------------------------------------------------------------- the format and its refusals

    [Fact]
    public void Every_state_record_of_the_project_is_registered()
    {
        var records = typeof(IStatefulDevice).Assembly.GetTypes()
            .Where(t => t.IsPublic && t.Name.EndsWith("State", StringComparison.Ordinal) && t.GetMethod("<Clone>$") is not null)
            .Except([typeof(PicChipState), typeof(PitChannelState), // parts of PicState and PitState
                typeof(ActorVmm.Devices.Virtio.VirtqueueState), typeof(ActorVmm.Devices.Virtio.VirtioPciCommonState)]) // parts of VirtioPciTransportState
            .ToList();
        Assert.NotEmpty(records);
        Assert.All(records, t => Assert.True(DeviceStateCodec.IsRegistered(t), $"{t.Name} is not registered"));
        Assert.Equal(records.Count, DeviceStateCodec.TypeNames.Count);
    }

    [Fact]
    public void Encoding_is_a_type_name_and_the_record_in_camel_case()
    {
        var json = Encoding.UTF8.GetString(DeviceStateCodec.Encode(new ResetControlState(0x0A)));

        using var doc = System.Text.Json.JsonDocument.Parse(json);
        Assert.Equal("reset-control", doc.RootElement.GetProperty("type").GetString());
        Assert.Equal(10, doc.RootElement.GetProperty("state").GetProperty("value").GetInt32());
    }

    [Fact]
    public void Encoding_a_type_that_is_not_a_registered_record_is_refused()
    {
        var e = Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Encode(new { Value = 1 }));
        Assert.Contains("not a device state record", e.Message);
    }

    [Theory]
    [InlineData("", "malformed device state")]
    [InlineData("{\"type\": \"reset-control\", \"state\": {\"value\": 1}", "malformed device state")]
    [InlineData("[1, 2]", "malformed device state")]
    [InlineData("null", "JSON null")]
    [InlineData("{\"state\": {\"value\": 1}}", "malformed device state")]
    [InlineData("{\"type\": \"System.IO.FileInfo\", \"state\": {}}", "unknown device state type \"System.IO.FileInfo\"")]
    [InlineData("{\"type\": \"reset-control\", \"state\": {\"value\": 1}, \"extra\": 0}", "malformed device state")]
    [InlineData("{\"type\": \"reset-control\", \"state\": null}", "reset-control state is JSON null")]
    [InlineData("{\"type\": \"reset-control\", \"state\": {}}", "reset-control state is malformed")]
    [InlineData("{\"type\": \"reset-control\", \"state\": {\"value\": 256}}", "reset-control state is malformed")]
    [InlineData("{\"type\": \"reset-control\", \"state\": {\"value\": \"1\"}}", "reset-control state is malformed")]
    [InlineData("{\"type\": \"reset-control\", \"state\": {\"value\": 1, \"Value\": 2}}", "reset-control state is malformed")]
    [InlineData("{\"type\": \"reset-control\", \"state\": {\"value\": 1, \"value\": 2}}", "Duplicate")]
    [InlineData("{\"type\": \"reset-control\", \"type\": \"i8042\", \"state\": {\"value\": 1}}", "malformed device state")]
    [InlineData("{\"type\": \"reset-control\", \"state\": {\"value\": 1, \"sysRst\": true}}", "reset-control state is malformed")]
    [InlineData("{\"type\": \"pic8259-pair\", \"state\": {\"master\": null, \"slave\": null, \"intr\": false}}", "pic8259-pair state is malformed")]
    [InlineData("{\"type\": \"cmos-rtc\", \"state\": {\"index\": 0, \"cmos\": \"AAAA\", \"offset\": \"00:00:00\"}}",
        "cmos-rtc state is not restorable: CMOS must have 128 bytes, not 3")]
    [InlineData("{\"type\": \"cmos-rtc\", \"state\": {\"index\": 0, \"cmos\": \"not base64!\", \"offset\": \"00:00:00\"}}", "cmos-rtc state is malformed")]
    [InlineData("{\"type\": \"cmos-rtc\", \"state\": {\"index\": 0, \"cmos\": null, \"offset\": \"00:00:00\"}}", "cmos-rtc state is malformed")]
    [InlineData("{\"type\": \"ioapic\", \"state\": {\"id\": 0, \"registerSelect\": 0, \"redirection\": [1, 2], \"pinLevels\": 0}}",
        "ioapic state is not restorable: redirection table must have 24 entries, not 2")]
    [InlineData("{\"type\": \"ioapic\", \"state\": {\"id\": 0, \"registerSelect\": 0, \"redirection\": null, \"pinLevels\": 0}}", "ioapic state is malformed")]
    [InlineData("{\"type\": \"pc-testdev\", \"state\": {\"scratch\": 0, \"iomem\": \"\"}}",
        "pc-testdev state is not restorable: MMIO RAM must have 65536 bytes, not 0")]
    public void Decoding_refuses_what_is_not_a_restorable_registered_record(string json, string reason)
    {
        var e = Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Decode(Utf8(json)));
        Assert.Contains(reason, e.Message);
    }

    [Fact]
    public void Decoding_refuses_a_uart_fifo_deeper_than_its_fcr_allows()
    {
        var uart = new Uart16550(new CountingInterruptLine(), _ => { });
        uart.Write(2, 1, 0x01);
        uart.OfferInput("abc"u8);
        var json = Encoding.UTF8.GetString(DeviceStateCodec.Encode(uart.State()));
        Assert.IsType<UartState>(DeviceStateCodec.Decode(Utf8(json)));

        var withoutFifo = json.Replace("\"fcr\": 1", "\"fcr\": 0", StringComparison.Ordinal);
        Assert.NotEqual(json, withoutFifo);

        var e = Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Decode(Utf8(withoutFifo)));
        Assert.Equal("uart16550 state is not restorable: receive FIFO holds 3 bytes, capacity is 1", e.Message);
    }

    [Fact]
    public void Decoding_refuses_a_pit_channel_missing_a_member()
    {
        var pit = new Pit8254(new ManualClock(), new CountingInterruptLine());
        var json = Encoding.UTF8.GetString(DeviceStateCodec.Encode(pit.State()));
        var cut = System.Text.RegularExpressions.Regex.Replace(json, "\"pendingInTicks\": -?[0-9]+,", "");
        Assert.NotEqual(json, cut);

        var e = Assert.Throws<SnapshotStateException>(() => DeviceStateCodec.Decode(Utf8(cut)));
        Assert.StartsWith("pit8254 state is malformed", e.Message);
        Assert.Contains("pendingInTicks", e.Message);
    }
}
