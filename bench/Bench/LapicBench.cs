using Akka.Configuration;
using ActorVmm.Host;
using ActorVmm.Host.Config;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Devices;
using ActorVmm.Lapic;
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
/// <item>IPI to a halted vcpu: vcpu 1 (real mode, x2APIC) announces that it is about to sleep in
/// <c>sti; hlt</c>; vcpu 0, interrupts off, waits for that, lets <see cref="HaltSettle"/> pass, sends
/// it a fixed IPI and spins until vcpu 1's handler answers in memory. Each wake-up is timed on vcpu
/// 0's TSC and kept: median, 99th percentile, maximum.</item>
/// <item>A TSC-deadline write whose deadline has already passed: vcpu 0, LVT timer in TSC-deadline
/// mode, interrupts on, writes IA32_TSC_DEADLINE with the TSC it has just read and spins until the
/// handler has run; timed from before the write to the handler's first instruction.</item>
/// <item>EOI cost: the EOI write alone in the handler of a periodic LAPIC timer interrupt (the TSC
/// before and after it), vcpu 0 spinning with interrupts on between interrupts.</item>
/// </list>
/// The first two: the guest marks the start and end of the measured part with writes to port 0x10;
/// the host takes the time of each when the marker device handles it (the same device path in both
/// modes). The other three time themselves on the guest's TSC, in memory, after
/// <see cref="WarmUp"/> operations that are not kept (the host's first pass through each path), and
/// give up on a wait after <see cref="GiveUp"/>, saying which (the row shows "-").
/// Every case also runs in a VM built with LibVmm only, under <see cref="BareApicLoop"/> (the same
/// exits, no actors): what any user-space local APIC costs on this host, against which both the
/// goals and the actors' share can be judged.
/// </summary>
internal static class LapicBench
{
    private const ulong Counter = 0x9F900;
    /// <summary>Interrupts the guest took inside STI's shadow (see <see cref="CountingHandler"/>).</summary>
    private const ulong ShadowCounter = 0x9F904;
    private const ulong Trampoline = 0x9000;     // SIPI vector 0x09
    private const ushort ApReady = 0x8F08;
    private const long LapicBase = InterruptCode.LapicBase;

    // The self-timed cases' results. Status: 0 when every operation completed, else
    // (what timed out << 32) | the operation it timed out in (warm-up ones included).
    private const ulong Status = 0x9F910;
    /// <summary>The TSC at the TSC-deadline handler's first instructions.</summary>
    private const ulong HandlerTsc = 0x9F918;
    /// <summary>One 64-bit TSC delta per kept operation; the warm-up ones go just below.</summary>
    private const ulong Samples = 0x20_0000;
    // The halted vcpu's (real mode, so below 64 KiB; in IDT gates no guest uses): its answers, its
    // announcement (answers + 1 as it goes to sleep), the interrupts it took inside STI's shadow.
    private const ushort Answers = 0x8F10;
    private const ushort Announced = 0x8F14;
    private const ushort TargetShadow = 0x8F18;

    /// <summary>How long the halted vcpu has been in its <c>sti; hlt</c> when the IPI is sent, after
    /// it announced the sleep: well past its HLT exit (a few µs on the slowest KVM here), inside
    /// halt polling (200 µs by default, KVM's and ours), as the suite that found the tail measures.</summary>
    private static readonly TimeSpan HaltSettle = TimeSpan.FromMicroseconds(50);
    /// <summary>The longest a self-timed guest waits for one event before it gives up.</summary>
    private static readonly TimeSpan GiveUp = TimeSpan.FromSeconds(5);
    /// <summary>The most operations a self-timed guest keeps (8 bytes each from <see cref="Samples"/>, 2 MiB, in 16 MiB).</summary>
    private const int MaxKept = 100_000;
    /// <summary>Operations before the kept ones: a tenth, from 2 to 50.</summary>
    private static int WarmUp(int operations) => Math.Clamp(operations / 10, 2, 50);

    /// <summary>What a self-timed guest gave up waiting for (its <see cref="Status"/>).</summary>
    private enum Stall
    {
        None = 0,
        TargetNeverSlept = 1,
        NoAnswer = 2,
        NoDeadlineInterrupt = 3,
        NoTimerInterrupt = 4,
        NoTscDeadlineTimer = 5,
    }

    /// <summary>The self-timed cases' keys.</summary>
    private const string HaltedIpi = "halted", Deadline = "deadline", Eoi = "eoi";

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
        var khz = TscKhz();
        long TscTicks(TimeSpan t) => (long)(t.TotalSeconds * khz * 1000);
        var pingPong = PingPong(roundTrips);
        var timer = Timer(ticks, periodMicroseconds);
        var (kept, keptTicks) = (Math.Min(roundTrips, MaxKept), Math.Min(ticks, MaxKept));
        var cases = new SelfTimed[]
        {
            new(HaltedIpi, 2, kept, HaltedIpiGuest(kept, WarmUp(kept), TscTicks(HaltSettle), TscTicks(GiveUp))),
            new(Deadline, 1, kept, DeadlinePassedGuest(kept, WarmUp(kept), TscTicks(GiveUp))),
            new(Eoi, 1, keptTicks, TimerEoiGuest(keptTicks, WarmUp(keptTicks), periodMicroseconds, TscTicks(GiveUp))),
        };
        var ipi = new Dictionary<string, double>();
        var rate = new Dictionary<string, double>();
        var inShadow = new Dictionary<string, long>();
        var taken = new Dictionary<(string Row, string Case), List<double[]>>(); // µs per operation, one array per repetition
        var stalled = new Dictionary<(string Row, string Case), string>();
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
                (ms, shadow) = variant.Mode is { } timed ? await Measure(timer, 1, timed, variant.Config) : RawTimer(timer);
                rate[variant.Key] = Math.Max(rate.GetValueOrDefault(variant.Key), ticks / (ms / 1000));
                inShadow[variant.Key] += shadow;
                foreach (var c in cases)
                {
                    if (stalled.ContainsKey((variant.Key, c.Key))) continue; // it gave up once: it would again
                    var result = await RunSelfTimed(c, variant);
                    inShadow[variant.Key] += result.InShadow;
                    if (result.Stalled is { } why) stalled[(variant.Key, c.Key)] = why;
                    else
                    {
                        if (!taken.TryGetValue((variant.Key, c.Key), out var list)) taken[(variant.Key, c.Key)] = list = [];
                        list.Add([.. result.Ticks.Select(t => t * 1000.0 / khz)]);
                    }
                }
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
        PrintSelfTimed(variants, taken, stalled, kept, keptTicks, reps, khz);
        if (inShadow.Values.Any(n => n > 0))
            Console.WriteLine("interrupts the guest took between sti and hlt (inside STI's interrupt shadow; no processor does that; " +
                              "the handler skipped the hlt): " + string.Join(", ", variants.Select(v => $"{v.Key} {inShadow[v.Key]}")));
        return 0;
    }

    /// <summary>One self-timed case: its key, its vcpus, the operations kept, its guest.</summary>
    private sealed record SelfTimed(string Key, int Cpus, int Operations, LongModeImage Image);

    /// <summary>A self-timed run: the TSC ticks of each kept operation, or why the guest gave up; and
    /// the interrupts it took inside STI's shadow.</summary>
    private sealed record SelfTimedResult(ulong[] Ticks, string? Stalled, uint InShadow);

    /// <summary>
    /// The halted-vcpu wake-ups: median, 99th percentile, maximum over every repetition's samples
    /// (the tail is the point), and max / median; the TSC-deadline write and the EOI: the mean per
    /// operation, the best repetition's (as the suite's exit benchmarks, total / operations). Then
    /// the ratios, their goals, the wake-ups above 10x their median, and why a row shows "-".
    /// </summary>
    private static void PrintSelfTimed(Variant[] variants, Dictionary<(string Row, string Case), List<double[]>> taken,
        Dictionary<(string Row, string Case), string> stalled, int roundTrips, int ticks, int reps, long khz)
    {
        double? Median(string row) => taken.TryGetValue((row, HaltedIpi), out var runs) ? Percentile(Pool(runs), 0.5) : null;
        double? Mean(string row, string c) => taken.TryGetValue((row, c), out var runs) ? runs.Min(r => r.Average()) : null;
        Console.WriteLine();
        Console.WriteLine($"IPI to a halted vcpu: sent {HaltSettle.TotalMicroseconds:F0} µs into its sti; hlt, until its handler answered, " +
                          $"{roundTrips} wake-ups x {reps} pooled; a TSC-deadline write with the deadline passed: until its handler ran, " +
                          $"mean of {roundTrips}; the EOI of a periodic timer interrupt: mean of {ticks}; best of {reps}");
        Console.WriteLine($"(on the guest's TSC, {khz} kHz; after {WarmUp(roundTrips)}, {WarmUp(roundTrips)} and {WarmUp(ticks)} warm-up operations)");
        Console.WriteLine($"{"",-38}{"halted IPI µs: median",22}{"p99",11}{"max",11}{"max/med",9}{"deadline µs/write",19}{"EOI µs",11}");
        foreach (var v in variants)
        {
            var line = $"{v.Name,-38}";
            if (taken.TryGetValue((v.Key, HaltedIpi), out var runs))
            {
                var all = Pool(runs);
                line += $"{Percentile(all, 0.5),22:F2}{Percentile(all, 0.99),11:F2}{all[^1],11:F2}{all[^1] / Percentile(all, 0.5),9:F1}";
            }
            else line += $"{"-",22}{"-",11}{"-",11}{"-",9}";
            line += Mean(v.Key, Deadline) is { } d ? $"{d,19:F2}" : $"{"-",19}";
            line += Mean(v.Key, Eoi) is { } e ? $"{e,11:F2}" : $"{"-",11}";
            Console.WriteLine(line);
        }
        string Of(double? a, double? b) => a is { } x && b is { } y ? $"{x / y:F2}" : "-";
        string Ratios(string a, string b) =>
            $"halted IPI median {Of(Median(a), Median(b))}, deadline write {Of(Mean(a, Deadline), Mean(b, Deadline))}, EOI {Of(Mean(a, Eoi), Mean(b, Eoi))}";
        Console.WriteLine($"emulated / assisted: {Ratios("emulated", "assisted")}   goal: each <= 1.5");
        Console.WriteLine($"  vlapics on the thread pool / assisted: {Ratios("pool", "assisted")}");
        Console.WriteLine($"  emulated / raw loop: {Ratios("emulated", "raw")}   raw loop / assisted: {Ratios("raw", "assisted")}");
        Console.WriteLine("halted-vcpu wake-ups above 10x their median (goal: none): " + string.Join(", ", variants.Select(v =>
        {
            if (!taken.TryGetValue((v.Key, HaltedIpi), out var runs)) return $"{v.Key} -";
            var all = Pool(runs);
            var median = Percentile(all, 0.5);
            return $"{v.Key} {all.Count(x => x > 10 * median)} of {all.Length}";
        })));
        foreach (var ((row, c), why) in stalled)
            Console.WriteLine($"  {row}, {c switch { HaltedIpi => "halted IPI", Deadline => "deadline write", _ => "EOI" }}: -, {why}");
    }

    private static double[] Pool(List<double[]> runs)
    {
        var all = runs.SelectMany(r => r).ToArray();
        Array.Sort(all);
        return all;
    }

    /// <summary>The nearest-rank percentile of sorted values.</summary>
    private static double Percentile(double[] sorted, double p) => sorted[Math.Clamp((int)Math.Ceiling(p * sorted.Length) - 1, 0, sorted.Length - 1)];

    /// <summary>KVM_GET_TSC_KHZ of a vcpu of a VM made for the asking: the guests' TSC rate on this host.</summary>
    private static long TscKhz()
    {
        using var kvm = Kvm.Open();
        using var vm = kvm.CreateVm();
        using var vcpu = vm.CreateVcpu(0, CpuidPolicy.ForPlatform(kvm.GetSupportedCpuid()));
        return vcpu.GetTscKhz();
    }

    /// <summary>Runs a self-timed guest in <paramref name="variant"/>'s row and reads what it left in memory.</summary>
    private static async Task<SelfTimedResult> RunSelfTimed(SelfTimed c, Variant variant)
    {
        if (variant.Mode is not { } mode)
            return RawRun(c.Image, c.Cpus, memory => ReadSelfTimed(memory, c));
        var (_, result) = await BenchGuest.RunAsync(
            new VmSpec($"bench-{c.Key}-{mode.ToString().ToLowerInvariant()}", 16 << 20, c.Cpus, c.Image, mode),
            (_, vm) => Task.FromResult(ReadSelfTimed(vm.Memory, c)), variant.Config, vm => SelfTimedState(vm.Memory));
        return result;
    }

    private static SelfTimedResult ReadSelfTimed(IGuestMemory memory, SelfTimed c)
    {
        var shadow = InShadow(memory) + (uint)memory.ReadUInt64(new GuestPhysAddr(TargetShadow));
        var status = memory.ReadUInt64(new GuestPhysAddr(Status));
        if (status != 0)
        {
            var at = (long)(uint)status - WarmUp(c.Operations);
            var where = at < 0 ? $"in warm-up operation {at + WarmUp(c.Operations) + 1}" : $"in operation {at + 1} of {c.Operations}";
            var gaveUp = (Stall)(status >> 32) == Stall.NoTscDeadlineTimer ? "the guest did not start" : $"the guest gave up after {GiveUp.TotalSeconds:F0} s {where}";
            return new SelfTimedResult([], $"{gaveUp}: " + (Stall)(status >> 32) switch
            {
                Stall.TargetNeverSlept => "vcpu 1 never announced its sleep",
                Stall.NoAnswer => "vcpu 1 never answered the IPI",
                Stall.NoDeadlineInterrupt => "no timer interrupt after IA32_TSC_DEADLINE was written with a deadline already passed",
                Stall.NoTimerInterrupt => "no periodic timer interrupt",
                Stall.NoTscDeadlineTimer => "its CPUID.01H:ECX[24] is clear: the VM offers no TSC-deadline timer",
                var other => $"status {other}",
            }, shadow);
        }
        var bytes = new byte[c.Operations * 8];
        memory.Read(new GuestPhysAddr(Samples), bytes);
        var ticks = new ulong[c.Operations];
        for (var i = 0; i < ticks.Length; i++) ticks[i] = BitConverter.ToUInt64(bytes, i * 8);
        return new SelfTimedResult(ticks, null, shadow);
    }

    /// <summary>For the watchdog of a self-timed guest that does not end.</summary>
    private static string SelfTimedState(IGuestMemory memory) =>
        $"guest: status {memory.ReadUInt64(new GuestPhysAddr(Status)):X}, counter {(uint)memory.ReadUInt64(new GuestPhysAddr(Counter))}, " +
        $"vcpu 1's answers {(uint)memory.ReadUInt64(new GuestPhysAddr(Answers))}, announced {(uint)memory.ReadUInt64(new GuestPhysAddr(Announced))}";

    /// <summary>
    /// The ping-pong guest in a VM built with LibVmm only, its two vcpus run by
    /// <see cref="BareApicLoop"/> with the emulated backend's APIC options: the same exits as under
    /// lapic = emulated, handled without actors. Returns the milliseconds between the guest's marks
    /// and the interrupts it took inside STI's shadow.
    /// </summary>
    private static (double Ms, uint InShadow) RawPingPong(LongModeImage image) => RawMarked(image, 2);

    /// <summary>The timer guest under <see cref="BareApicLoop"/> and its timer service.</summary>
    private static (double Ms, uint InShadow) RawTimer(LongModeImage image) => RawMarked(image, 1);

    private static (double Ms, uint InShadow) RawMarked(LongModeImage image, int cpus)
    {
        var marks = new Marks();
        var shadow = RawRun(image, cpus, InShadow, marks);
        return (marks.Milliseconds(1, 2), shadow);
    }

    /// <summary>Runs <paramref name="image"/> in a LibVmm-only VM under <see cref="BareApicLoop"/>, its
    /// local APICs with the emulated backend's options (for its CPUID) on the clock those were paired
    /// with; then reads its memory.</summary>
    private static T RawRun<T>(LongModeImage image, int cpus, Func<IGuestMemory, T> read, Marks? marks = null)
    {
        using var vm = new RawVm(image, 16 << 20, cpus, userSpaceApic: true);
        var clock = new MonotonicClock();
        new BareApicLoop(vm.Vcpus, marks, VmBuilder.EmulatedLapicOptions(vm.Vcpus[0], clock, vm.Cpuid), clock)
            .Run(TimeSpan.FromMinutes(10), id => $"RIP={vm.Vcpus[id].GetRegisters().Rip:X}");
        return read(vm.Memory);
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
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], 1 << 24);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x4500);                            // INIT
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x4600 | (uint)(Trampoline >> 12)); // SIPI
            a.mov(rdi, (long)ApReady);
            a.Label(ref ready);
            a.pause();
            a.cmp(__byte_ptr[rdi], 1);
            a.jne(ready);
            a.xor(r12d, r12d);
            BenchGuest.Mark(a, 1);
            a.Label(ref next);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], 1 << 24);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x41);                              // ping: fixed 0x41 to APIC 1
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
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerDivide], 0xB);                       // divide by 1: 1 GHz
        a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x2_0030);                  // periodic, vector 0x30
        a.mov(r12d, ticks);
        BenchGuest.Mark(a, 1);
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerInitialCount], periodMicroseconds * 1000); // initial count: starts the timer
        SleepUntilCounter(a, hlt);
        BenchGuest.Mark(a, 2);
        a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x1_0030);                  // masked
        BenchGuest.ExitOk(a);
        CountingHandler(a, tick, hlt);
    });

    /// <summary>Guest code: RAX = the TSC. Clobbers RDX.</summary>
    private static void ReadTsc(Assembler a)
    {
        a.rdtsc();
        a.shl(rdx, 32);
        a.or(rax, rdx);
    }

    /// <summary>Guest code, in a wait: to <paramref name="gaveUp"/> once more than R15 TSC ticks
    /// have passed since <paramref name="since"/>. Clobbers RAX, RDX.</summary>
    private static void GiveUpAfter(Assembler a, AssemblerRegister64 since, Label gaveUp)
    {
        ReadTsc(a);
        a.sub(rax, since);
        a.cmp(rax, r15);
        a.ja(gaveUp);
    }

    /// <summary>Guest code at <paramref name="here"/>: <see cref="Status"/> = (<paramref name="stall"/>
    /// &lt;&lt; 32) | R12 (the operation it was in), then on to <paramref name="end"/>.</summary>
    private static void Stalled(Assembler a, Label here, Stall stall, Label end)
    {
        a.Label(ref here);
        a.mov(rax, (long)stall << 32);
        a.or(rax, r12);
        a.mov(rdi, (long)Status);
        a.mov(__qword_ptr[rdi], rax);
        a.jmp(end);
    }

    /// <summary>
    /// vcpu 1 of the halted-vcpu case, in real mode (started by INIT-SIPI at <see cref="Trampoline"/>,
    /// CS = its page, DS = SS = 0), x2APIC on: announces each sleep at <see cref="Announced"/> (its
    /// answers so far + 1), then sleeps in <c>sti; hlt</c>; the handler of vector 0x41 answers first
    /// (<see cref="Answers"/> + 1: vcpu 0's clock stops there), then EOIs. The handler returns past a
    /// <c>hlt</c> it interrupted (inside STI's shadow, see <see cref="InterruptCode.ReturnPastInterruptedHlt"/>;
    /// counted at <see cref="TargetShadow"/>), so that every sleep is announced. Assembled until the
    /// handler's and the hlt's offsets, which the code names before it places them, stand still.
    /// </summary>
    private static byte[] HaltedTarget()
    {
        byte[] Assemble(ushort handlerAt, ushort hltAt, out ushort handler, out ushort hlt)
        {
            var a = new Assembler(16);
            var entry = a.CreateLabel();
            var sleep = a.CreateLabel();
            var halt = a.CreateLabel();
            var onTime = a.CreateLabel();
            a.cli();
            a.xor(ax, ax);
            a.mov(ds, ax);
            a.mov(ss, ax);
            a.mov(sp, 0x8E00);
            a.mov(__word_ptr[0x41 * 4], handlerAt);             // IVT 0x41
            a.mov(__word_ptr[0x41 * 4 + 2], (ushort)(Trampoline >> 4));
            a.mov(ecx, 0x1B);                                   // IA32_APIC_BASE: EN | EXTD
            a.rdmsr();
            a.or(eax, 0xC00);
            a.wrmsr();
            a.mov(ecx, 0x80F);                                  // x2APIC SVR: enabled, spurious 0xFF
            a.mov(eax, 0x1FF);
            a.xor(edx, edx);
            a.wrmsr();
            a.Label(ref sleep);
            a.cli();
            a.mov(eax, __dword_ptr[Answers]);
            a.inc(eax);
            a.mov(__dword_ptr[Announced], eax);
            a.sti();
            a.Label(ref halt);
            a.hlt();
            a.jmp(sleep);
            a.Label(ref entry);
            a.push(bp);                                         // a hlt interrupted inside STI's shadow:
            a.mov(bp, sp);                                      // return past it (frame: IP, CS, FLAGS)
            a.push(ax);
            a.mov(ax, hltAt);
            a.cmp(__word_ptr[bp + 2], ax);
            a.jne(onTime);
            a.inc(__word_ptr[bp + 2]);
            a.inc(__dword_ptr[TargetShadow]);
            a.Label(ref onTime);
            a.pop(ax);
            a.pop(bp);
            a.inc(__dword_ptr[Answers]);                        // the answer
            a.push(eax);
            a.push(ecx);
            a.push(edx);
            InterruptCode.X2ApicEoi(a);
            a.pop(edx);
            a.pop(ecx);
            a.pop(eax);
            a.iret();
            using var stream = new MemoryStream();
            var result = a.Assemble(new StreamCodeWriter(stream), Trampoline, BlockEncoderOptions.ReturnNewInstructionOffsets);
            handler = (ushort)(result.GetLabelRIP(entry) - Trampoline);
            hlt = (ushort)(result.GetLabelRIP(halt) - Trampoline);
            return stream.ToArray();
        }

        ushort handlerAt = 0, hltAt = 0;
        for (var pass = 0; pass < 4; pass++)
        {
            var code = Assemble(handlerAt, hltAt, out var handler, out var hlt);
            if (handler == handlerAt && hlt == hltAt) return code;
            (handlerAt, hltAt) = (handler, hlt);
        }
        throw new InvalidOperationException("the halted vcpu's handler and hlt offsets did not settle");
    }

    /// <summary>
    /// IPI to a halted vcpu, vcpu 0's side (64-bit, xAPIC MMIO, interrupts off): starts vcpu 1
    /// (<see cref="HaltedTarget"/>); then, each round, waits until vcpu 1 announced that it sleeps
    /// after its latest answer, lets <paramref name="settleTicks"/> pass (it is in its <c>hlt</c>),
    /// reads the TSC, sends fixed vector 0x41 to APIC 1 and spins until the answer; the TSC delta of
    /// each round goes to <see cref="Samples"/> (the <paramref name="warmUp"/> first below it).
    /// </summary>
    private static LongModeImage HaltedIpiGuest(int operations, int warmUp, long settleTicks, long giveUpTicks)
    {
        var target = HaltedTarget();
        return BenchGuest.Long(a =>
        {
            var trampoline = a.CreateLabel();
            var round = a.CreateLabel();
            var waitSleep = a.CreateLabel();
            var sleeping = a.CreateLabel();
            var settle = a.CreateLabel();
            var waitAnswer = a.CreateLabel();
            var answered = a.CreateLabel();
            var end = a.CreateLabel();
            var neverSlept = a.CreateLabel();
            var noAnswer = a.CreateLabel();
            a.lea(rsi, __[trampoline]);
            a.mov(rdi, (long)Trampoline);
            a.mov(ecx, target.Length);
            a.rep.movsb();
            InterruptCode.EnableLocalApic(a);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], 1 << 24);                           // to APIC 1, from here on
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x4500);                            // INIT
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x4600 | (uint)(Trampoline >> 12)); // SIPI
            a.mov(r9, (long)Answers);                                           // [r9]: answers, [r9 + 4]: announced
            a.mov(r13, (long)(Samples - (ulong)warmUp * 8));
            a.mov(r14, settleTicks);
            a.mov(r15, giveUpTicks);
            a.xor(r12d, r12d);
            a.Label(ref round);
            ReadTsc(a);
            a.mov(r10, rax);
            a.Label(ref waitSleep);                                             // announced = answers + 1: it sleeps
            a.mov(r8d, __dword_ptr[r9]);
            a.lea(eax, __[r8 + 1]);
            a.cmp(__dword_ptr[r9 + 4], eax);
            a.je(sleeping);
            a.pause();
            GiveUpAfter(a, r10, neverSlept);
            a.jmp(waitSleep);
            a.Label(ref sleeping);
            ReadTsc(a);
            a.mov(r10, rax);
            a.Label(ref settle);
            a.pause();
            ReadTsc(a);
            a.sub(rax, r10);
            a.cmp(rax, r14);
            a.jb(settle);
            ReadTsc(a);
            a.mov(r10, rax);                                                    // the clock starts
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x41);                              // fixed, vector 0x41
            a.Label(ref waitAnswer);
            a.cmp(__dword_ptr[r9], r8d);
            a.jne(answered);
            a.pause();
            GiveUpAfter(a, r10, noAnswer);
            a.jmp(waitAnswer);
            a.Label(ref answered);
            ReadTsc(a);
            a.sub(rax, r10);
            a.mov(__qword_ptr[r13 + r12 * 8], rax);
            a.inc(r12d);
            a.cmp(r12d, operations + warmUp);
            a.jb(round);
            a.Label(ref end);
            BenchGuest.ExitOk(a);
            Stalled(a, neverSlept, Stall.TargetNeverSlept, end);
            Stalled(a, noAnswer, Stall.NoAnswer, end);
            a.Label(ref trampoline);
            a.db(target);
        });
    }

    /// <summary>
    /// A TSC-deadline write whose deadline has already passed (64-bit, 1 vcpu, interrupts on
    /// throughout): LVT timer in TSC-deadline mode, vector 0x30; each operation reads the TSC, writes
    /// it to IA32_TSC_DEADLINE (passed by the time the write is done: the timer fires at once, SDM
    /// Vol 3A §10.5.4.1) and spins until the handler counted it. Kept: the handler's first TSC
    /// (<see cref="HandlerTsc"/>) minus the TSC read before the write. A VM whose CPUID shows no
    /// TSC-deadline timer (CPUID.01H:ECX[24]) is told by <see cref="Stall.NoTscDeadlineTimer"/>.
    /// </summary>
    private static LongModeImage DeadlinePassedGuest(int operations, int warmUp, long giveUpTicks) => BenchGuest.Long(a =>
    {
        var handler = a.CreateLabel();
        var write = a.CreateLabel();
        var wait = a.CreateLabel();
        var fired = a.CreateLabel();
        var end = a.CreateLabel();
        var noInterrupt = a.CreateLabel();
        var noTimer = a.CreateLabel();
        var exit = a.CreateLabel();
        const int handlerTsc = (int)(HandlerTsc - Counter);
        a.xor(r12d, r12d);
        a.mov(eax, 1);
        a.cpuid();
        a.bt(ecx, 24);                                   // CPUID.01H:ECX.TSC_Deadline
        a.jnc(noTimer);
        SetGate(a, 0x30, handler);
        InterruptCode.EnableLocalApic(a);
        a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x4_0030);       // LVT timer: TSC-deadline mode (10b), vector 0x30
        a.mov(r9, (long)Counter);
        a.mov(r13, (long)(Samples - (ulong)warmUp * 8));
        a.mov(r15, giveUpTicks);
        a.sti();
        a.Label(ref write);
        a.mov(r8d, __dword_ptr[r9]);                     // interrupts taken so far
        a.mov(ecx, 0x6E0);                               // IA32_TSC_DEADLINE
        a.rdtsc();
        a.mov(r10, rdx);                                 // the TSC now: the deadline and the clock's start
        a.shl(r10, 32);
        a.mov(r11d, eax);
        a.or(r10, r11);
        a.wrmsr();
        a.Label(ref wait);
        a.cmp(__dword_ptr[r9], r8d);
        a.jne(fired);
        a.pause();
        GiveUpAfter(a, r10, noInterrupt);
        a.jmp(wait);
        a.Label(ref fired);
        a.mov(rax, __qword_ptr[r9 + handlerTsc]);
        a.sub(rax, r10);
        a.mov(__qword_ptr[r13 + r12 * 8], rax);
        a.inc(r12d);
        a.cmp(r12d, operations + warmUp);
        a.jb(write);
        a.Label(ref end);
        a.cli();
        a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x5_0030);       // masked
        a.Label(ref exit);
        BenchGuest.ExitOk(a);
        Stalled(a, noInterrupt, Stall.NoDeadlineInterrupt, end);
        Stalled(a, noTimer, Stall.NoTscDeadlineTimer, exit);
        a.Label(ref handler);
        a.push(rax);
        a.push(rdx);
        a.push(rdi);
        ReadTsc(a);
        a.mov(rdi, (long)Counter);
        a.mov(__qword_ptr[rdi + handlerTsc], rax);
        a.inc(__dword_ptr[rdi]);
        InterruptCode.Eoi(a);
        a.pop(rdi);
        a.pop(rdx);
        a.pop(rax);
        a.iretq();
    });

    /// <summary>
    /// The EOI of a timer interrupt (64-bit, 1 vcpu, spinning with interrupts on): LVT timer
    /// periodic, vector 0x30, divide by 1 (1 GHz); the handler reads the TSC (after what came before
    /// it: lfence), writes the EOI, reads it again (after the write is done: mfence, lfence), and keeps
    /// the difference, one per interrupt.
    /// </summary>
    private static LongModeImage TimerEoiGuest(int operations, int warmUp, int periodMicroseconds, long giveUpTicks) => BenchGuest.Long(a =>
    {
        var tick = a.CreateLabel();
        var next = a.CreateLabel();
        var wait = a.CreateLabel();
        var end = a.CreateLabel();
        var noInterrupt = a.CreateLabel();
        var kept = a.CreateLabel();
        SetGate(a, 0x30, tick);
        InterruptCode.EnableLocalApic(a);
        a.mov(r9, (long)Counter);
        a.mov(r13, (long)(Samples - (ulong)warmUp * 8));
        a.mov(r15, giveUpTicks);
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerDivide], 0xB);                       // divide by 1: 1 GHz
        a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x2_0030);                  // periodic, vector 0x30
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerInitialCount], periodMicroseconds * 1000); // initial count: starts the timer
        a.sti();
        a.Label(ref next);
        a.mov(r12d, __dword_ptr[r9]);                               // interrupts taken so far
        a.cmp(r12d, operations + warmUp);
        a.jae(end);
        ReadTsc(a);
        a.mov(r10, rax);
        a.Label(ref wait);
        a.cmp(__dword_ptr[r9], r12d);
        a.jne(next);
        a.pause();
        GiveUpAfter(a, r10, noInterrupt);
        a.jmp(wait);
        a.Label(ref end);
        a.cli();
        a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x1_0030);                  // masked
        BenchGuest.ExitOk(a);
        Stalled(a, noInterrupt, Stall.NoTimerInterrupt, end);
        a.Label(ref tick);
        a.push(rax);
        a.push(rdx);
        a.push(rcx);
        a.push(rdi);
        a.lfence();
        ReadTsc(a);
        a.mov(rcx, rax);
        a.mov(rdi, LapicBase);
        a.mov(__dword_ptr[rdi + ApicOffsets.Eoi], 0);        // the EOI
        a.mfence();
        a.lfence();
        ReadTsc(a);
        a.sub(rax, rcx);
        a.mov(rdi, (long)Counter);
        a.mov(ecx, __dword_ptr[rdi]);
        a.cmp(ecx, operations + warmUp);
        a.jae(kept);                                                // one past the last: not kept
        a.mov(__qword_ptr[r13 + rcx * 8], rax);
        a.Label(ref kept);
        a.inc(__dword_ptr[rdi]);
        a.pop(rdi);
        a.pop(rcx);
        a.pop(rdx);
        a.pop(rax);
        a.iretq();
    });
}
