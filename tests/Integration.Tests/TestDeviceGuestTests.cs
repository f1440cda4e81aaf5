using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Real guests driving QEMU's test devices (<see cref="PcTestDevice"/>, on with
/// <see cref="VmSpec.TestDevices"/>) as standard x86 conformance suites do: interrupt lines through
/// the block at 0x2000 (to the IOAPIC and, from real mode, through the 8259), instruction emulation
/// on the MMIO RAM at 0xFF000000, the scratch register and the page-flush port. The 64-bit guests are
/// built as in <see cref="LapicGuestTests"/>; where a step fails, the guest exits with status
/// (step &lt;&lt; 1) | 1, so the status names the step (1: all passed).
/// </summary>
public sealed class TestDeviceGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Buffer = 0x20_0000;      // guest RAM the guests copy from and to
    private const ulong Counter = 0x9F950;       // the interrupt handlers' count
    private const long Iomem = (long)Platform.TestDevIomemBase;

    private static LongModeImage Long(Action<Assembler> body)
    {
        var a = new Assembler(64);
        body(a);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    private static async Task<GuestRun> RunAsync(BootImage image, LapicMode lapic = LapicMode.Emulated, bool testDevices = true,
        VmspaceOptions? paging = null)
    {
        var run = await GuestRun.StartAsync(new VmSpec("guest", 16 << 20, 1, image, lapic, Paging: paging) { TestDevices = testDevices });
        await run.WaitAsync();
        return run;
    }

    private static string Describe(GuestRun run) =>
        $"{run.Outcome}" + (run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: > 1 } o ? $" (step {o.ExitCode >> 1} failed)" : "");

    private static void AssertPassed(GuestRun run) =>
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, Describe(run));

    /// <summary>R15 = <paramref name="step"/>, the status <see cref="FailedStep"/> reports.</summary>
    private static void Step(Assembler a, int step) => a.mov(r15d, step);

    /// <summary>At <paramref name="failed"/>: exit with the step in R15 (status (step &lt;&lt; 1) | 1).</summary>
    private static void FailedStep(Assembler a, Label failed)
    {
        a.Label(ref failed);
        a.mov(eax, r15d);
        a.@out(0xF4, al);
    }

    private static void ExitPassed(Assembler a)
    {
        a.mov(al, 0);
        a.@out(0xF4, al);
    }

    // ---------------------------------------------------------------- interrupt lines

    /// <summary>
    /// A line of the block at 0x2000 drives an IOAPIC pin (vector 0x5E, physical destination APIC 0):
    /// line 14 (an ISA IRQ, to the 8259 too, where it is masked) or line 19 (an IOAPIC pin only).
    /// Edge: the guest raises and drops the line once, and the handler must run once. Level: the
    /// guest raises it and leaves it up; the first handler only EOIs, so the line, still up, must be
    /// delivered again once that EOI cleared Remote IRR; the second handler drops the line through
    /// the block, then EOIs. Then, after a while with interrupts on (a late extra delivery would show),
    /// the count must be exact and the entry's Remote IRR clear.
    /// </summary>
    [KvmTheory]
    [InlineData(LapicMode.Emulated, false, 14)]
    [InlineData(LapicMode.Emulated, true, 19)]
    [InlineData(LapicMode.Assisted, false, 19)]
    [InlineData(LapicMode.Assisted, true, 14)]
    public async Task A_guest_drives_an_ioapic_pin_through_the_line_block(LapicMode lapic, bool level, int line)
    {
        const byte vector = 0x5E;
        var expected = level ? 2 : 1;
        var image = Long(a =>
        {
            var handler = a.CreateLabel();
            var done = a.CreateLabel();
            var hlt = a.CreateLabel();
            var failed = a.CreateLabel();
            InterruptCode.SetGate(a, vector, handler);
            InterruptCode.EnableLocalApic(a);
            InterruptCode.RouteIoApicPin(a, line, vector, levelTriggered: level);
            a.mov(rsi, (long)Counter);
            a.mov(__dword_ptr[rsi], 0);
            a.mov(dx, (ushort)(Platform.TestDevIrqPort + line));
            a.mov(al, 1);
            a.@out(dx, al);                                            // the line goes up
            if (!level)
            {
                a.mov(al, 0);
                a.@out(dx, al);                                        // and down: one edge
            }
            Step(a, 1);
            InterruptCode.SleepUntilCountThenLinger(a, expected, hlt);
            Step(a, 2);
            a.cmp(__dword_ptr[rsi], expected);
            a.jne(failed);
            Step(a, 3);
            InterruptCode.JumpIfRemoteIrr(a, line, failed);
            ExitPassed(a);
            FailedStep(a, failed);

            a.Label(ref handler);
            InterruptCode.ReturnPastInterruptedHlt(a, hlt);
            a.push(rax);
            a.push(rdx);
            a.push(rdi);
            a.mov(rdi, (long)Counter);
            a.inc(__dword_ptr[rdi]);
            if (level)
            {
                a.cmp(__dword_ptr[rdi], 2);
                a.jb(done);                                            // the first time: the line stays up
                a.mov(dx, (ushort)(Platform.TestDevIrqPort + line));
                a.mov(al, 0);
                a.@out(dx, al);                                        // the second: down, through the block
            }
            a.Label(ref done);
            InterruptCode.Eoi(a);
            a.pop(rdi);
            a.pop(rdx);
            a.pop(rax);
            a.iretq();
        });
        await using var run = await RunAsync(image, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 },
            $"{Describe(run)}; handler ran {run.Vm.Memory.ReadUInt64(new GuestPhysAddr(Counter)) & 0xFFFF_FFFF} times");
    }

    /// <summary>
    /// The real-mode conformance test that hung: with the 8259 programmed (vector bases 0x20/0x28,
    /// IRQ 2 and IRQ 11 unmasked, edge-triggered), the guest raises and drops IRQ 11 with 32-bit
    /// OUTs to port 0x200B while interrupts are off, then sleeps in <c>sti; hlt</c>. The request the
    /// 8259 latched must wake it through IRQ 11's vector (0x2B) and no other (a spurious IRQ 7 or 15
    /// ends the run with status 3); status 1 after exactly one IRQ 11. The 8259 reaches the vcpu as
    /// ExtINT through LINT0 of vcpu 0's local APIC, emulated or KVM's.
    /// </summary>
    [KvmTheory]
    [InlineData(LapicMode.Emulated)]
    [InlineData(LapicMode.Assisted)]
    public async Task A_real_mode_guest_sleeping_in_sti_hlt_gets_irq_11_raised_through_port_0x200B(LapicMode lapic)
    {
        const ushort origin = 0x7C00, handlerAt = 0x7E00, spuriousAt = 0x7F00, flag = 0x6000;
        var main = new Assembler(16);
        var fill = main.CreateLabel();
        var hlt = main.CreateLabel();
        var failed = main.CreateLabel();
        main.cli();
        main.xor(ax, ax);
        main.mov(ds, ax);
        main.mov(ss, ax);
        main.mov(sp, 0x7000);
        main.mov(__word_ptr[flag], 0);
        main.mov(di, 0x20 * 4);                  // IVT 0x20-0x2F: the spurious handler ...
        main.mov(cx, 16);
        main.Label(ref fill);
        main.mov(__word_ptr[di], spuriousAt);
        main.mov(__word_ptr[di + 2], 0);
        main.add(di, 4);
        main.loop(fill);
        main.mov(__word_ptr[0x2B * 4], handlerAt); // ... but IRQ 11's
        foreach (var (command, data, vectorBase, icw3) in new (byte, byte, byte, byte)[] { (0x20, 0x21, 0x20, 0x04), (0xA0, 0xA1, 0x28, 0x02) })
        {
            main.mov(al, 0x11);                  // ICW1: edge, cascade, ICW4 follows
            main.@out(command, al);
            main.mov(al, vectorBase);            // ICW2
            main.@out(data, al);
            main.mov(al, icw3);                  // ICW3
            main.@out(data, al);
            main.mov(al, 0x01);                  // ICW4: 8086 mode
            main.@out(data, al);
        }
        main.mov(al, 0b1111_1011);               // master: IRQ 2 (the slave) unmasked
        main.@out(0x21, al);
        main.mov(al, 0b1111_0111);               // slave: IRQ 11 unmasked
        main.@out(0xA1, al);
        main.mov(dx, (ushort)(Platform.TestDevIrqPort + 11));
        main.mov(eax, 1);
        main.@out(dx, eax);                      // set IRQ 11
        main.mov(eax, 0);
        main.@out(dx, eax);                      // clear IRQ 11
        main.sti();
        main.Label(ref hlt);
        main.hlt();
        main.cli();
        main.cmp(__word_ptr[flag], 1);
        main.jne(failed);
        main.mov(al, 0);
        main.@out(0xF4, al);
        main.Label(ref failed);
        main.mov(al, 1);
        main.@out(0xF4, al);
        main.hlt();
        using var stream = new MemoryStream();
        var hltAt = (ushort)main.Assemble(new StreamCodeWriter(stream), origin, BlockEncoderOptions.ReturnNewInstructionOffsets)
            .GetLabelRIP(hlt);
        var code = stream.ToArray();
        Assert.True(code.Length <= handlerAt - origin, "the main code runs into the handler");

        // IRQ 11: past the hlt if it came inside STI's shadow (where no processor delivers one, but the
        // KVM box's emulated SVM can: see InterruptCode.ReturnPastInterruptedHlt), count, EOI both 8259s.
        var handler = new Assembler(16);
        var onTime = handler.CreateLabel();
        handler.push(bp);
        handler.mov(bp, sp);
        handler.cmp(__word_ptr[bp + 2], hltAt);   // the interrupted IP
        handler.jne(onTime);
        handler.inc(__word_ptr[bp + 2]);
        handler.Label(ref onTime);
        handler.pop(bp);
        handler.inc(__word_ptr[flag]);
        handler.mov(al, 0x20);                   // non-specific EOI
        handler.@out(0xA0, al);
        handler.@out(0x20, al);
        handler.iret();
        var spurious = new Assembler(16);
        spurious.mov(al, 1);
        spurious.@out(0xF4, al);                 // status 3
        spurious.hlt();

        var image = new byte[0x200 + 0x100 + 0x10];
        code.CopyTo(image, 0);
        GuestCode.Assemble(handler, handlerAt).CopyTo(image, handlerAt - origin);
        GuestCode.Assemble(spurious, spuriousAt).CopyTo(image, spuriousAt - origin);
        await using var run = await RunAsync(new FlatImage(image, origin, 0, origin), lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 },
            $"{run.Outcome}; IRQ 11 handler ran {run.Vm.Memory.ReadUInt64(new GuestPhysAddr(flag)) & 0xFFFF} times");
    }

    // ---------------------------------------------------------------- MMIO RAM

    /// <summary>
    /// ALU and string instructions with an operand in the MMIO RAM at 0xFF000000, which KVM's
    /// instruction emulator runs through MMIO exits: each must read and write what a processor
    /// would with plain memory there (unassigned MMIO reads all ones). The pc-testdev actor must
    /// have served them (its access counters), and the guest's RAM holds what it copied back.
    /// </summary>
    [KvmFact]
    public async Task Alu_and_string_instructions_on_the_mmio_ram_act_as_on_memory()
    {
        const long pattern1 = 0x0706_0504_0302_0100, pattern2 = 0x0F0E_0D0C_0B0A_0908;
        var image = Long(a =>
        {
            var failed = a.CreateLabel();
            a.cld();
            a.mov(rbx, Iomem);

            Step(a, 1);                                    // mov, 64 bits
            a.mov(rax, unchecked((long)0x89AB_CDEF_0123_4567));
            a.mov(__qword_ptr[rbx], rax);
            a.mov(rcx, __qword_ptr[rbx]);
            a.cmp(rcx, rax);
            a.jne(failed);

            Step(a, 2);                                    // add imm to memory
            a.mov(__dword_ptr[rbx + 8], 10);
            a.add(__dword_ptr[rbx + 8], 5);
            a.cmp(__dword_ptr[rbx + 8], 15);
            a.jne(failed);

            Step(a, 3);                                    // add reg to memory, memory to reg
            a.mov(eax, 0x100);
            a.add(__dword_ptr[rbx + 8], eax);
            a.mov(ecx, 1);
            a.add(ecx, __dword_ptr[rbx + 8]);
            a.cmp(ecx, 0x110);
            a.jne(failed);

            Step(a, 4);                                    // or
            a.mov(__byte_ptr[rbx + 0x10], 0xF0);
            a.or(__byte_ptr[rbx + 0x10], 0x0F);
            a.cmp(__byte_ptr[rbx + 0x10], 0xFF);
            a.jne(failed);

            Step(a, 5);                                    // and
            a.and(__byte_ptr[rbx + 0x10], 0x3C);
            a.cmp(__byte_ptr[rbx + 0x10], 0x3C);
            a.jne(failed);

            Step(a, 6);                                    // xor
            a.xor(__byte_ptr[rbx + 0x10], 0xFF);
            a.cmp(__byte_ptr[rbx + 0x10], 0xC3);
            a.jne(failed);

            Step(a, 7);                                    // cmp sets the flags from memory
            a.mov(__word_ptr[rbx + 0x12], 0x1234);
            a.cmp(__word_ptr[rbx + 0x12], 0x1235);
            a.jae(failed);                                 // 0x1234 < 0x1235: CF set
            a.mov(ax, 0x1234);
            a.cmp(__word_ptr[rbx + 0x12], ax);
            a.jne(failed);

            Step(a, 8);                                    // movsb RAM → MMIO
            a.mov(rdi, (long)Buffer);
            a.mov(rax, pattern1);
            a.mov(__qword_ptr[rdi], rax);
            a.mov(rax, pattern2);
            a.mov(__qword_ptr[rdi + 8], rax);
            a.mov(rsi, (long)Buffer);
            a.lea(rdi, __[rbx + 0x100]);
            a.mov(ecx, 16);
            a.rep.movsb();
            a.mov(rax, pattern1);
            a.cmp(__qword_ptr[rbx + 0x100], rax);
            a.jne(failed);
            a.mov(rax, pattern2);
            a.cmp(__qword_ptr[rbx + 0x108], rax);
            a.jne(failed);

            Step(a, 9);                                    // movsq MMIO → RAM
            a.lea(rsi, __[rbx + 0x100]);
            a.mov(rdi, (long)Buffer + 0x100);
            a.mov(ecx, 2);
            a.rep.movsq();
            a.mov(rdi, (long)Buffer + 0x100);
            a.mov(rax, pattern1);
            a.cmp(__qword_ptr[rdi], rax);
            a.jne(failed);
            a.mov(rax, pattern2);
            a.cmp(__qword_ptr[rdi + 8], rax);
            a.jne(failed);

            Step(a, 10);                                   // movsb MMIO → MMIO
            a.lea(rsi, __[rbx + 0x101]);
            a.lea(rdi, __[rbx + 0x300]);
            a.mov(ecx, 8);
            a.rep.movsb();
            a.mov(rax, 0x0807_0605_0403_0201);
            a.cmp(__qword_ptr[rbx + 0x300], rax);
            a.jne(failed);

            Step(a, 11);                                   // stosd, then lodsd
            a.mov(eax, unchecked((int)0xA5A5_5A5A));
            a.lea(rdi, __[rbx + 0x200]);
            a.mov(ecx, 4);
            a.rep.stosd();
            a.xor(eax, eax);
            a.lea(rsi, __[rbx + 0x20C]);
            a.lodsd();
            a.cmp(eax, unchecked((int)0xA5A5_5A5A));
            a.jne(failed);
            a.lea(rax, __[rbx + 0x210]);
            a.cmp(rsi, rax);                               // lodsd moved the pointer on
            a.jne(failed);
            a.mov(rax, unchecked((long)0xA5A5_5A5A_A5A5_5A5A));
            a.cmp(__qword_ptr[rbx + 0x200], rax);
            a.jne(failed);

            Step(a, 12);                                   // cmpxchg that succeeds
            a.mov(__dword_ptr[rbx + 0x40], 7);
            a.mov(eax, 7);
            a.mov(ecx, 9);
            a.@lock.cmpxchg(__dword_ptr[rbx + 0x40], ecx);
            a.jne(failed);
            a.cmp(__dword_ptr[rbx + 0x40], 9);
            a.jne(failed);

            Step(a, 13);                                   // cmpxchg that fails: the memory value comes back
            a.mov(eax, 7);
            a.mov(ecx, 11);
            a.@lock.cmpxchg(__dword_ptr[rbx + 0x40], ecx);
            a.je(failed);
            a.cmp(eax, 9);
            a.jne(failed);
            a.cmp(__dword_ptr[rbx + 0x40], 9);
            a.jne(failed);

            Step(a, 14);                                   // xchg
            a.mov(__dword_ptr[rbx + 0x48], 0x11);
            a.mov(eax, 0x22);
            a.xchg(__dword_ptr[rbx + 0x48], eax);
            a.cmp(eax, 0x11);
            a.jne(failed);
            a.cmp(__dword_ptr[rbx + 0x48], 0x22);
            a.jne(failed);

            Step(a, 15);                                   // the last quadword of the 64 KiB
            a.mov(rax, 0x1122_3344_5566_7788);
            a.mov(__qword_ptr[rbx + 0xFFF8], rax);
            a.cmp(__qword_ptr[rbx + 0xFFF8], rax);
            a.jne(failed);
            ExitPassed(a);
            FailedStep(a, failed);
        });
        await using var run = await RunAsync(image);
        AssertPassed(run);
        Assert.Equal(0x0706_0504_0302_0100UL, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(Buffer + 0x100)));
        var stats = await run.AskChild<DeviceProtocol.Stats>(PcPlatform.TestDeviceName, DeviceProtocol.GetStats.Instance);
        Assert.True(stats.Reads >= 30 && stats.Writes >= 30, $"pc-testdev served {stats.Reads} reads and {stats.Writes} writes");
    }

    // ---------------------------------------------------------------- scratch register

    /// <summary>The scratch register at 0xE0-0xE3 (any size, any byte) and again at 0xE8-0xEB.</summary>
    [KvmFact]
    public async Task The_scratch_register_reads_back_at_every_size_through_both_windows()
    {
        var image = Long(a =>
        {
            var failed = a.CreateLabel();
            Step(a, 1);
            a.mov(eax, unchecked((int)0x8765_4321));
            a.@out(0xE0, eax);
            a.xor(eax, eax);
            a.@in(eax, 0xE0);
            a.cmp(eax, unchecked((int)0x8765_4321));
            a.jne(failed);
            Step(a, 2);
            a.@in(al, 0xE1);
            a.cmp(al, 0x43);
            a.jne(failed);
            Step(a, 3);
            a.@in(ax, 0xE2);
            a.cmp(ax, 0x8765);
            a.jne(failed);
            Step(a, 4);
            a.@in(al, 0xE3);
            a.cmp(al, 0x87);
            a.jne(failed);
            Step(a, 5);
            a.@in(eax, 0xE8);                              // the byte-wide window: the same register
            a.cmp(eax, unchecked((int)0x8765_4321));
            a.jne(failed);
            Step(a, 6);
            a.mov(al, 0xAA);
            a.@out(0xE9, al);
            a.@in(eax, 0xE0);
            a.cmp(eax, unchecked((int)0x8765_AA21));
            a.jne(failed);
            Step(a, 7);
            a.mov(ax, 0xBBCC);
            a.@out(0xEA, ax);
            a.@in(eax, 0xE8);
            a.cmp(eax, unchecked((int)0xBBCC_AA21));
            a.jne(failed);
            Step(a, 8);
            a.@in(ax, 0xE1);                               // unaligned: bytes 1 and 2
            a.cmp(ax, 0xCCAA);
            a.jne(failed);
            Step(a, 9);
            a.mov(al, 0x11);
            a.@out(0xE0, al);
            a.@in(eax, 0xE0);
            a.cmp(eax, unchecked((int)0xBBCC_AA11));
            a.jne(failed);
            ExitPassed(a);
            FailedStep(a, failed);
        });
        await using var run = await RunAsync(image);
        AssertPassed(run);
    }

    // ---------------------------------------------------------------- flush port



    /// <summary>Whether this process maps guest RAM page <paramref name="gpa"/> in the guest view (the
    /// mapping KVM's memslots point at) now: /proc/self/pagemap, bit 63 "present".</summary>
    private static bool MappedInGuestView(GuestRun run, ulong gpa)
    {
        var memory = (GuestMemoryMap)run.Vm.Memory;
        var segment = memory.Find(new GuestPhysAddr(gpa)) ?? throw new InvalidOperationException($"0x{gpa:X} is not guest memory");
        var address = (ulong)segment.Backing.GuestView + segment.BackingOffset + (gpa - segment.Base.Value);
        using var pagemap = File.OpenHandle("/proc/self/pagemap");
        var entry = new byte[8];
        RandomAccess.Read(pagemap, entry, (long)(address / 4096 * 8));
        return (BitConverter.ToUInt64(entry) & (1UL << 63)) != 0;
    }

    /// <summary>
    /// The guest writes a value to a RAM page (step 1), flushes the page through port 0xE4 (step 2),
    /// reads the value back (step 3) and exits with status 1 if it is unchanged. The host looks between
    /// the steps: the flush dropped the page from the guest view KVM maps guest memory through (the
    /// vmspace counts one flushed page), and the guest's read after it faulted the page in again. With
    /// demand paging that fault is the vmspace's: the page's accessed bit, clear after the flush, is
    /// set again by exactly one MINOR fault; without, the kernel's page table shows the guest view's
    /// mapping gone after the flush and back after the read (KVM faulted it in).
    /// </summary>
    [KvmTheory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_page_flushed_through_port_0xE4_is_faulted_in_again_with_its_contents(bool demandPaging)
    {
        const ulong page = Buffer + 0x5000;
        var image = Long(a =>
        {
            var failed = a.CreateLabel();
            a.mov(rdi, (long)page + 0x80);
            a.mov(rax, 0x0DDC_0FFE_EBAD_F00D);
            a.mov(__qword_ptr[rdi], rax);
            HostGate.SignalAndWait(a, 1);
            a.mov(eax, (int)page + 0x80);                  // any address in the page
            a.@out(0xE4, eax);
            HostGate.SignalAndWait(a, 2);
            a.mov(rdi, (long)page + 0x80);
            a.mov(rax, __qword_ptr[rdi]);
            a.mov(rsi, rax);
            HostGate.SignalAndWait(a, 3);
            Step(a, 1);
            a.mov(rax, 0x0DDC_0FFE_EBAD_F00D);
            a.cmp(rsi, rax);
            a.jne(failed);
            ExitPassed(a);
            FailedStep(a, failed);
        });
        var gate = new HostGate();
        var spec = new VmSpec("guest", 16 << 20, 1, image, Paging: demandPaging ? VmspaceOptions.Paged() : null) { TestDevices = true };
        await using var run = await GuestRun.StartAsync(spec, gate.Device());
        var vmspace = await run.ResolveChild("vmspace");
        async Task<VmspaceProtocol.Stats> Stats() =>
            await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, TimeSpan.FromSeconds(10));
        async Task<bool> Accessed() =>
            ((await vmspace.Ask<VmspaceProtocol.AccessedDirty>(new VmspaceProtocol.ScanAccessedDirty(1, page, 4096), TimeSpan.FromSeconds(10)))
                .Pages[0] & PageAD.Accessed) != 0;
        async Task<bool> Mapped() => demandPaging ? await Accessed() : MappedInGuestView(run, page);

        await gate.ReachedAsync(1, run);
        Assert.True(await Mapped(), "the page the guest wrote is not mapped");
        gate.Release(1);

        await gate.ReachedAsync(2, run);
        var flushed = await Stats();
        Assert.Equal(1, flushed.FlushedPages);
        Assert.False(await Mapped(), "the flushed page is still mapped for the guest");
        gate.Release(2);

        await gate.ReachedAsync(3, run);
        Assert.True(await Mapped(), "the guest read the page without faulting it in");
        if (demandPaging)
        {
            var read = await Stats();
            Assert.Equal((flushed.Paging.MissingFaults, flushed.Paging.MinorFaults + 1), (read.Paging.MissingFaults, read.Paging.MinorFaults));
        }
        gate.Release(3);

        await run.WaitAsync();
        AssertPassed(run);
    }

    // ---------------------------------------------------------------- off by default

    /// <summary>Without the switch (the default) the test devices' ports and MMIO RAM are unassigned:
    /// reads are all ones, writes go nowhere, and the VM has no such device.</summary>
    [KvmFact]
    public async Task Without_the_switch_the_test_devices_are_absent()
    {
        const ulong results = Buffer;
        var image = Long(a =>
        {
            a.mov(rdi, (long)results);
            a.mov(eax, 0x1234_5678);
            a.@out(0xE0, eax);
            a.@in(eax, 0xE0);
            a.mov(__dword_ptr[rdi], eax);
            a.@in(eax, 0xE8);
            a.mov(__dword_ptr[rdi + 4], eax);
            a.mov(rbx, Iomem);
            a.mov(__qword_ptr[rbx], rdi);
            a.mov(rax, __qword_ptr[rbx]);
            a.mov(__qword_ptr[rdi + 8], rax);
            a.mov(dx, (ushort)(Platform.TestDevIrqPort + 4));
            a.mov(al, 1);
            a.@out(dx, al);
            a.@in(al, dx);
            a.mov(__byte_ptr[rdi + 16], al);
            ExitPassed(a);
        });
        await using var run = await RunAsync(image, testDevices: false);
        AssertPassed(run);
        Assert.Equal(ulong.MaxValue, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(results)));
        Assert.Equal(ulong.MaxValue, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(results + 8)));
        Assert.Equal(0xFFUL, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(results + 16)) & 0xFF);
        Assert.DoesNotContain(PcPlatform.TestDeviceName, (await run.StatusAsync()).Devices);
    }
}
