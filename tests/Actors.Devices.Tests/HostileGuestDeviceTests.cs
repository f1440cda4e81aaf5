namespace ActorVmm.Devices.Tests;

/// <summary>
/// A hostile guest against the platform's device models: seeded random reads and writes of every
/// size at every offset of each device's window (and just past it), with interrupt lines toggled,
/// EOIs and time going by (early and late deadline callbacks), and the state saved now and then.
/// A device model must take whatever the guest does without throwing: an exception here would
/// crash the device's actor on every such access. A failure names the seed that reproduces it.
/// </summary>
public sealed class HostileGuestDeviceTests
{
    private const int Seeds = 40;
    private const int Steps = 2_000;

    private static readonly ulong[] Interesting = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0xFFFF_FFFF, ulong.MaxValue, 0x8000_0000_0000_0000];

    private sealed class NullBus : IApicBus
    {
        public int Messages;
        public void Deliver(ApicMessage m) => Messages++;
    }

    /// <summary>One device model as the guest and the platform see it.</summary>
    private sealed record Target(string Name, IBusDevice Device, ulong Length, Action<Random> Poke, IStatefulDevice? State, ITimedDevice? Timed,
        CountingInterruptLine? Irq = null);

    private static IEnumerable<Target> Targets(ManualClock clock)
    {
        var ioapic = new IoApic(new NullBus(), id: 1);
        yield return new Target("ioapic", ioapic, IoApic.Length, r =>
        {
            if (r.Next(4) == 0) ioapic.EndOfInterrupt((byte)r.Next(256));
            else Toggle(((IInterruptInputs)ioapic).Input(r.Next(-2, 26)), r);
        }, ioapic, null);

        var intr = new CountingInterruptLine();
        var pic = new Pic8259Pair(intr);
        IInterruptLine PicIrq(Random r) => pic.Irq(r.Next(15) is var n && n >= Pic8259Pair.CascadeIrq ? n + 1 : n); // IRQ 2 is wiring, not an input
        yield return new Target("pic master", pic.Master, Pic8259Pair.Length, r => Toggle(PicIrq(r), r), null, null, intr);
        yield return new Target("pic slave", pic.Slave, Pic8259Pair.Length, r => Toggle(PicIrq(r), r), null, null);
        yield return new Target("pic elcr", pic.Elcr, Pic8259Pair.ElcrLength, r => { if (r.Next(2) == 0) pic.Master.Read(0, 1); }, null, null);

        var irq0 = new CountingInterruptLine();
        var pit = new Pit8254(clock, irq0);
        yield return new Target("pit", pit, 4, _ => { }, pit, pit, irq0);
        yield return new Target("pit port 0x61", pit.SpeakerPort, PitSpeakerPort.Length, _ => { }, null, pit);

        var irq8 = new CountingInterruptLine();
        var rtc = new CmosRtc(() => new DateTime(2026, 12, 5, 23, 59, 58, DateTimeKind.Utc), clock, irq8);
        yield return new Target("rtc", rtc, 2, _ => { }, rtc, rtc, irq8);

        var irq4 = new CountingInterruptLine();
        var uart = new Uart16550(irq4, _ => { });
        yield return new Target("uart", uart, 8, r =>
        {
            var input = new byte[r.Next(0, 40)];
            r.NextBytes(input);
            uart.OfferInput(input);
        }, uart, null, irq4);

        var kbc = new I8042(new RecordingEvents());
        yield return new Target("i8042", kbc, 5, _ => { }, kbc, null);

        var port92 = new SystemControlPortA(new RecordingEvents());
        yield return new Target("port 0x92", port92, SystemControlPortA.Length, _ => { }, port92, null);
        var rcr = new ResetControl(new RecordingEvents());
        yield return new Target("port 0xcf9", rcr, ResetControl.Length, _ => { }, rcr, null);
        var pm = new AcpiPm(clock, new RecordingEvents());
        yield return new Target("acpi pm", pm, AcpiPm.Length, _ => { }, pm, null);
        var lines = Enumerable.Range(0, PcTestDevice.Lines).Select(_ => new CountingInterruptLine()).ToArray();
        var testdev = new PcTestDevice(new RecordingEvents(), lines);
        foreach (var (window, length) in new[]
                 {
                     (PcTestDevice.ScratchWindow, 4UL), (PcTestDevice.FlushWindow, 4UL), (PcTestDevice.ByteScratchWindow, 4UL),
                     (PcTestDevice.IrqWindow, (ulong)PcTestDevice.Lines), (PcTestDevice.IomemWindow, (ulong)PcTestDevice.IomemLength),
                 })
            yield return new Target($"pc-testdev window 0x{window:X}", new WindowView(testdev, window), length, _ => { }, testdev, null,
                window == PcTestDevice.IrqWindow ? lines[0] : null);
    }

    /// <summary>One window of a multi-window model, seen from offset 0 as the bus would show it.</summary>
    private sealed class WindowView(IBusDevice device, ulong window) : IBusDevice
    {
        public ulong Read(ulong offset, int size) => device.Read(window + offset, size);
        public void Write(ulong offset, int size, ulong value) => device.Write(window + offset, size, value);
    }

    private static void Toggle(IInterruptLine? line, Random r)
    {
        switch (r.Next(3))
        {
            case 0: line?.Assert(); break;
            case 1: line?.Deassert(); break;
            default: line?.Pulse(); break;
        }
    }

    private static ulong Value(Random r) =>
        r.Next(3) == 0 ? Interesting[r.Next(Interesting.Length)] : (ulong)r.NextInt64() ^ ((ulong)r.Next() << 33);

    private static int Size(Random r) => r.Next(8) switch { 0 => 2, 1 => 4, 2 => 8, 3 => r.Next(0, 17), _ => 1 };

    [Fact]
    public void Every_device_model_takes_random_guest_accesses_without_throwing()
    {
        var failures = new List<string>();
        var raised = new Dictionary<string, int>();
        for (var seed = 0; seed < Seeds; seed++)
        {
            var clock = new ManualClock();
            foreach (var target in Targets(clock))
            {
                var r = new Random(seed);
                var step = 0;
                try
                {
                    for (; step < Steps; step++)
                    {
                        // Mostly inside the window (register offsets are small), sometimes past it.
                        var offset = r.Next(10) == 0 ? (ulong)r.Next((int)Math.Min(target.Length + 16, int.MaxValue))
                            : (ulong)r.Next((int)Math.Min(target.Length, 0x60));
                        switch (r.Next(10))
                        {
                            case < 4:
                                target.Device.Read(offset, Size(r));
                                break;
                            case < 8:
                                target.Device.Write(offset, Size(r), Value(r));
                                break;
                            case 8:
                                target.Poke(r);
                                break;
                            default:
                                // Time goes by; the timer callback may come early, on time or late.
                                clock.Advance(TimeSpan.FromTicks(r.Next(3) == 0 ? r.NextInt64(TimeSpan.TicksPerSecond * 5) : r.Next(20_000)));
                                target.Timed?.OnDeadline();
                                _ = target.Timed?.NextDeadline;
                                target.State?.SaveState();
                                break;
                        }
                    }
                }
                catch (Exception e)
                {
                    failures.Add($"{target.Name}, seed {seed}, step {step}: {e.GetType().Name}: {e.Message}");
                }
                if (target.Irq is { } irq) raised[target.Name] = raised.GetValueOrDefault(target.Name) + irq.AssertCalls + irq.PulseCalls;
            }
        }
        Assert.True(failures.Count == 0, $"{failures.Count} device run(s) threw: {string.Join("; ", failures.Take(8))}");
        // The random guest got the devices somewhere: each one with an interrupt line raised it.
        Assert.All(raised, d => Assert.True(d.Value > 0, $"{d.Key} never raised its interrupt"));
        Assert.Equal(5, raised.Count); // pic, pit, rtc, uart, pc-testdev's line 0
    }
}
