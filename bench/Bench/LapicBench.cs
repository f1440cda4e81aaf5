using Akka.Configuration;
using ActorVmm.Host;
using ActorVmm.Host.Config;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Devices;
using ActorVmm.LibVmm;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Bench;

/// <summary>
/// Local APIC costs under both backends (lapic = emulated | assisted), the same guests in one run:
/// <list type="bullet">
/// <item>IPI ping-pong: vcpu 0 (64-bit, xAPIC MMIO) sends vector 0x41 to vcpu 1 and sleeps until
/// vcpu 1 (real mode, x2APIC MSRs) answers with vector 0x40 from its handler; N round trips.</item>
/// <item>Timer: vcpu 0's LAPIC timer in periodic mode with a given period; the guest sleeps in HLT
/// until it has taken K interrupts. Reports interrupts per second against the programmed rate.</item>
/// </list>
/// The guest marks the start and end of the measured part with writes to port 0x10; the host takes
/// the time of each when the marker device handles it (the same device path in both modes).
/// The ping-pong also runs in a VM built with LibVmm only, under <see cref="BareApicLoop"/> (the
/// same exits, no actors): what any user-space local APIC costs on this host, against which both
/// the goal and the actors' share can be judged.
/// </summary>
internal static class LapicBench
{
    private const ulong Counter = 0x9F900;
    /// <summary>Interrupts the guest took inside STI's shadow (see <see cref="CountingHandler"/>).</summary>
    private const ulong ShadowCounter = 0x9F904;
    private const ulong Trampoline = 0x9000;     // SIPI vector 0x09
    private const ushort ApReady = 0x8F08;
    private const long LapicBase = InterruptCode.LapicBase;

    /// <summary>A row: a backend and where the vlapic actors run (on their senders' threads, the
    /// default actorvmm.vlapic-dispatcher, or on the thread pool, for comparison); or, with no
    /// backend, the raw loop.</summary>
    private sealed record Variant(string Key, string Name, LapicMode? Mode, bool OnPool)
    {
        public Akka.Configuration.Config Config => OnPool
            ? ConfigurationFactory.ParseString("actorvmm.vlapic-dispatcher.type = Dispatcher").WithFallback(VmConfig.Load(null))
            : VmConfig.Load(null);
    }

    private static readonly Variant[] Variants =
    [
        new("raw", "raw loop, LocalApic models, no actors", null, OnPool: false),
        new("emulated", "emulated", LapicMode.Emulated, OnPool: false),
        new("pool", "emulated, vlapics on the thread pool", LapicMode.Emulated, OnPool: true),
        new("assisted", "assisted", LapicMode.Assisted, OnPool: false),
    ];

    /// <summary>The bench's rows from "all" or a comma-separated list of raw, emulated, pool, assisted.</summary>
    private static IReadOnlyList<string>? ParseRows(string text)
    {
        if (text == "all") return [.. Variants.Select(v => v.Key)];
        var keys = text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        return keys.Length > 0 && keys.All(k => Variants.Any(v => v.Key == k)) ? keys : null;
    }

    public static async Task<int> RunAsync(int roundTrips, int ticks, int periodMicroseconds, int reps, string rows = "all")
    {
        if (ParseRows(rows) is not { } keys)
        {
            Console.Error.WriteLine($"lapic: the rows are all or a comma-separated list of {string.Join(", ", Variants.Select(v => v.Key))}, not \"{rows}\"");
            return 2;
        }
        if (!BenchGuest.KvmAvailable()) return 2;
        HostRunner.ConfigureLogging();
        var variants = Variants.Where(v => keys.Contains(v.Key)).ToArray();
        var pingPong = PingPong(roundTrips);
        var timer = Timer(ticks, periodMicroseconds);
        var ipi = new Dictionary<string, double>();
        var rate = new Dictionary<string, double>();
        var inShadow = new Dictionary<string, long>();
        foreach (var variant in variants)
        {
            ipi[variant.Key] = double.MaxValue;
            inShadow[variant.Key] = 0;
            for (var i = 0; i < reps; i++)
            {
                var (ms, shadow) = variant.Mode is { } mode
                    ? await Measure(pingPong, 2, mode, variant.Config, PingPongState)
                    : RawPingPong(pingPong);
                ipi[variant.Key] = Math.Min(ipi[variant.Key], ms);
                inShadow[variant.Key] += shadow;
                if (variant.Mode is not { } timed) continue; // the raw loop has no LAPIC timer service
                (ms, shadow) = await Measure(timer, 1, timed, variant.Config);
                rate[variant.Key] = Math.Max(rate.GetValueOrDefault(variant.Key), ticks / (ms / 1000));
                inShadow[variant.Key] += shadow;
            }
        }
        Console.WriteLine($"local APIC: {roundTrips} IPI round trips between 2 vcpus; {ticks} periodic timer interrupts " +
                          $"every {periodMicroseconds} µs ({1e6 / periodMicroseconds:F0}/s programmed); best of {reps}");
        Console.WriteLine($"{"",-38}{"µs/round trip",15}{"timer irq/s",13}");
        foreach (var variant in variants)
            Console.WriteLine($"{variant.Name,-38}{ipi[variant.Key] * 1000 / roundTrips,15:F2}" +
                              (rate.TryGetValue(variant.Key, out var r) ? $"{r,13:F0}" : $"{"-",13}"));
        string Ratio(string a, string b) => ipi.TryGetValue(a, out var x) && ipi.TryGetValue(b, out var y) ? $"{x / y:F2}" : "-";
        Console.WriteLine($"IPI round trip, emulated / assisted: {Ratio("emulated", "assisted")}   goal: <= 2" +
                          $"   (vlapics on the thread pool: {Ratio("pool", "assisted")})");
        Console.WriteLine($"  raw loop / assisted: {Ratio("raw", "assisted")} (the least a user-space local APIC costs on this host)" +
                          $"   emulated / raw loop: {Ratio("emulated", "raw")} (what the actors add)");
        if (inShadow.Values.Any(n => n > 0))
            Console.WriteLine("interrupts the guest took between sti and hlt (inside STI's interrupt shadow; no processor does that; " +
                              "the handler skipped the hlt): " + string.Join(", ", variants.Select(v => $"{v.Key} {inShadow[v.Key]}")));
        return 0;
    }

    /// <summary>
    /// The ping-pong guest in a VM built with LibVmm only, its two vcpus run by
    /// <see cref="BareApicLoop"/> with the emulated backend's APIC options: the same exits as under
    /// lapic = emulated, handled without actors. Returns the milliseconds between the guest's marks
    /// and the interrupts it took inside STI's shadow.
    /// </summary>
    private static (double Ms, uint InShadow) RawPingPong(LongModeImage image)
    {
        using var vm = new RawVm(image, 16 << 20, cpus: 2, userSpaceApic: true);
        var marks = new Marks();
        new BareApicLoop(vm.Vcpus, marks, VmBuilder.EmulatedLapicOptions(vm.Vcpus[0], new MonotonicClock()))
            .Run(TimeSpan.FromMinutes(10), id => $"RIP={vm.Vcpus[id].GetRegisters().Rip:X}");
        return (marks.Milliseconds(1, 2), InShadow(vm.Memory));
    }

    /// <summary>Runs the guest; returns the milliseconds between its two marks and the interrupts it
    /// took inside STI's shadow.</summary>
    private static async Task<(double Ms, uint InShadow)> Measure(LongModeImage image, int cpus, LapicMode mode,
        Akka.Configuration.Config config, Func<RunningVm, string>? guestState = null)
    {
        var (marks, inShadow) = await BenchGuest.RunAsync(new VmSpec($"bench-{mode.ToString().ToLowerInvariant()}", 16 << 20, cpus, image, mode),
            (_, vm) => Task.FromResult(InShadow(vm.Memory)), config, guestState);
        return (marks.Milliseconds(1, 2), inShadow);
    }

    private static uint InShadow(IGuestMemory memory) => (uint)memory.ReadUInt64(new GuestPhysAddr(ShadowCounter));

    /// <summary>For the watchdog of a ping-pong that does not end: how far the guest got.</summary>
    private static string PingPongState(RunningVm vm)
    {
        var pongs = (uint)vm.Memory.ReadUInt64(new GuestPhysAddr(Counter));
        var ready = (byte)vm.Memory.ReadUInt64(new GuestPhysAddr(ApReady));
        return $"guest: {pongs} pongs taken (its counter; vcpu 0's R12 counts the pings sent), AP ready {ready}";
    }

    private static void SetGate(Assembler a, byte vector, Label handler) => InterruptCode.SetGate(a, vector, handler);

    /// <summary>
    /// The handler: count, EOI, return. An interrupt taken between the <c>sti</c> and the
    /// <c>hlt</c> of <see cref="SleepUntilCounter"/> (inside STI's interrupt shadow, where no
    /// processor delivers one) would return to the <c>hlt</c>, which would then sleep with nothing
    /// left to wake it: the handler skips that <c>hlt</c> and counts the event at
    /// <see cref="ShadowCounter"/>. (The KVM box's emulated SVM does this now and then.)
    /// </summary>
    private static void CountingHandler(Assembler a, Label handler, Label hlt)
    {
        a.Label(ref handler);
        InterruptCode.ReturnPastInterruptedHlt(a, hlt, ShadowCounter);
        a.push(rdi);
        a.mov(rdi, (long)Counter);
        a.inc(__dword_ptr[rdi]);
        InterruptCode.Eoi(a);
        a.pop(rdi);
        a.iretq();
    }

    /// <summary>Mark, then sleep (sti; hlt) until the counter reaches R12D; interrupts off after.
    /// <paramref name="hlt"/> labels the hlt.</summary>
    private static void SleepUntilCounter(Assembler a, Label hlt)
    {
        var check = a.CreateLabel();
        var done = a.CreateLabel();
        a.mov(rdi, (long)Counter);
        a.Label(ref check);
        a.cmp(__dword_ptr[rdi], r12d);
        a.jae(done);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.jmp(check);
        a.Label(ref done);
    }

    /// <summary>vcpu 1 in real mode: IVT 0x41 → its handler, x2APIC on, ready; the handler EOIs and
    /// sends vector 0x40 to APIC 0 through the x2APIC ICR.</summary>
    private static byte[] Responder() => InterruptCode.ApTrampoline(Trampoline, 0x41,
        a => a.mov(__byte_ptr[ApReady], 1),
        a =>
        {
            a.push(eax);
            a.push(ecx);
            a.push(edx);
            InterruptCode.X2ApicEoi(a);
            a.mov(ecx, 0x830);             // ICR: fixed, vector 0x40, to APIC 0 (EDX)
            a.mov(eax, 0x40);
            a.wrmsr();
            a.pop(edx);
            a.pop(ecx);
            a.pop(eax);
            a.iret();
        });

    private static LongModeImage PingPong(int roundTrips)
    {
        var ap = Responder();
        return BenchGuest.Long(a =>
        {
            var pong = a.CreateLabel();
            var trampoline = a.CreateLabel();
            var ready = a.CreateLabel();
            var next = a.CreateLabel();
            var hlt = a.CreateLabel();
            SetGate(a, 0x40, pong);
            a.lea(rsi, __[trampoline]);
            a.mov(rdi, (long)Trampoline);
            a.mov(ecx, ap.Length);
            a.rep.movsb();
            InterruptCode.EnableLocalApic(a);
            a.mov(__dword_ptr[rbx + 0x310], 1 << 24);
            a.mov(__dword_ptr[rbx + 0x300], 0x4500);                            // INIT
            a.mov(__dword_ptr[rbx + 0x300], 0x4600 | (uint)(Trampoline >> 12)); // SIPI
            a.mov(rdi, (long)ApReady);
            a.Label(ref ready);
            a.pause();
            a.cmp(__byte_ptr[rdi], 1);
            a.jne(ready);
            a.xor(r12d, r12d);
            BenchGuest.Mark(a, 1);
            a.Label(ref next);
            a.mov(__dword_ptr[rbx + 0x310], 1 << 24);
            a.mov(__dword_ptr[rbx + 0x300], 0x41);                              // ping: fixed 0x41 to APIC 1
            a.inc(r12d);
            SleepUntilCounter(a, hlt);                                          // pong: 0x40 counted
            a.cmp(r12d, roundTrips);
            a.jb(next);
            BenchGuest.Mark(a, 2);
            BenchGuest.ExitOk(a);
            CountingHandler(a, pong, hlt);
            a.Label(ref trampoline);
            a.db(ap);
        });
    }

    private static LongModeImage Timer(int ticks, int periodMicroseconds) => BenchGuest.Long(a =>
    {
        var tick = a.CreateLabel();
        var hlt = a.CreateLabel();
        SetGate(a, 0x30, tick);
        InterruptCode.EnableLocalApic(a);
        a.mov(__dword_ptr[rbx + 0x3E0], 0xB);                       // divide by 1: 1 GHz
        a.mov(__dword_ptr[rbx + 0x320], 0x2_0030);                  // periodic, vector 0x30
        a.mov(r12d, ticks);
        BenchGuest.Mark(a, 1);
        a.mov(__dword_ptr[rbx + 0x380], periodMicroseconds * 1000); // initial count: starts the timer
        SleepUntilCounter(a, hlt);
        BenchGuest.Mark(a, 2);
        a.mov(__dword_ptr[rbx + 0x320], 0x1_0030);                  // masked
        BenchGuest.ExitOk(a);
        CountingHandler(a, tick, hlt);
    });
}
