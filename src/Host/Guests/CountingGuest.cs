using ActorVmm.Host.Boot;
using ActorVmm.Lapic;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Host.Guests;

/// <summary>
/// A guest whose progress can be checked across a snapshot and a restore. vcpu 0 counts the ticks of
/// its local APIC timer (periodic, vector 0x30): after each tick it prints the next number on COM1
/// ("1\n", "2\n", ...; one number per loop, however many ticks came, so the numbers are consecutive by
/// construction and only a lost or replayed byte or register breaks them) and rewrites one quadword of
/// a 256 KiB region, keeping the sum of the region in R13. After <c>limit</c> it sums the region again
/// and prints "sum ok" (debug-exit status 1) or "sum bad" (status 2): memory restored wrong, or R13.
/// <para>With 2 vcpus vcpu 0 first starts vcpu 1 (INIT-SIPI), which loops in real mode raising EBX
/// and storing it at <see cref="ApMirror"/>. vcpu 0 checks at each tick that the mirror never goes
/// back (a restarted or lost AP would start again from 0): else "ap lost" (status 3); at the end,
/// that it still moves ("ap stopped", status 4).</para>
/// <para><c>touchBytes</c> of memory from <see cref="TouchBase"/> are written once at start (a page
/// each), so a snapshot has that much memory to save.</para>
/// </summary>
public static class CountingGuest
{
    public const ulong Code = 0x10_0000;
    public const ulong Region = 0x20_0000;
    public const int RegionPages = 64;
    public const ulong TouchBase = 0x100_0000;
    public const ulong Ticks = 0x9FA00;
    public const ulong ApMirror = 0x9FA08;
    public const ulong LastSeen = 0x9FA10;
    public const ulong Trampoline = 0x9000; // SIPI vector 0x09
    public const byte TimerVector = 0x30;

    public const int SumOk = 1, SumBad = 2, ApLost = 3, ApStopped = 4;

    /// <param name="limit">the last number printed before the check</param>
    /// <param name="tickNanoseconds">the timer's period (the local APIC timer counts at 1 GHz with divide by 1)</param>
    /// <param name="touchBytes">memory written once at start, from <see cref="TouchBase"/></param>
    /// <param name="cpus">1, or 2 with a second vcpu looping in real mode</param>
    public static LongModeImage Build(int limit, uint tickNanoseconds = 1_000_000, ulong touchBytes = 0, int cpus = 1)
    {
        if (cpus is < 1 or > 2) throw new ArgumentOutOfRangeException(nameof(cpus), "1 or 2 vcpus");
        var a = new Assembler(64);
        var tick = a.CreateLabel();
        var wait = a.CreateLabel();
        var hlt = a.CreateLabel();
        var print = a.CreateLabel();
        var puts = a.CreateLabel();
        var trampoline = a.CreateLabel();
        var ap = ApCode();

        // Touch memory: one quadword per page.
        if (touchBytes > 0)
        {
            var touch = a.CreateLabel();
            a.mov(rdi, (long)TouchBase);
            a.mov(rcx, (long)(touchBytes / 4096));
            a.Label(ref touch);
            a.mov(__qword_ptr[rdi], rdi);
            a.add(rdi, 4096);
            a.dec(rcx);
            a.jnz(touch);
        }
        if (cpus == 2)
        {
            InterruptCode.StartAps(a, trampoline, ap.Length, Trampoline, destination: 1, shorthand: 0);
        }
        InterruptCode.SetGate(a, TimerVector, tick);
        InterruptCode.EnableLocalApic(a);
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerDivide], 0b1011);            // divide by 1
        a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x2_0000 | TimerVector); // periodic
        a.mov(__dword_ptr[rbx + ApicOffsets.TimerInitialCount], unchecked((int)tickNanoseconds));
        a.xor(r12, r12);                 // the last number printed
        a.xor(r13, r13);                 // the sum of the region's quadwords (all zero at start)
        a.mov(rsi, (long)Ticks);

        a.Label(ref wait);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.cmp(__qword_ptr[rsi], r12);
        a.jbe(wait);
        a.inc(r12);
        a.mov(rax, r12);
        a.call(print);
        // Rewrite quadword (n / 64) % 512 of page n % 64 with n * golden ratio; keep the sum.
        a.mov(rax, r12);
        a.and(rax, RegionPages - 1);
        a.shl(rax, 12);
        a.mov(rcx, r12);
        a.shr(rcx, 6);
        a.and(rcx, 511);
        a.lea(rdi, __[rax + rcx * 8]);
        a.mov(rax, (long)Region);
        a.add(rdi, rax);
        a.sub(r13, __qword_ptr[rdi]);
        a.mov(rax, r12);
        a.mov(rcx, unchecked((long)0x9E37_79B9_7F4A_7C15UL));
        a.imul(rax, rcx);
        a.mov(__qword_ptr[rdi], rax);
        a.add(r13, rax);
        if (cpus == 2)
        {
            // The AP's count never goes back.
            var onward = a.CreateLabel();
            a.mov(rdi, (long)ApMirror);
            a.mov(eax, __dword_ptr[rdi]);
            a.mov(rdi, (long)LastSeen);
            a.cmp(eax, __dword_ptr[rdi]);
            a.jae(onward);
            Finish(a, puts, "ap lost\n", ApLost);
            a.Label(ref onward);
            a.mov(__dword_ptr[rdi], eax);
        }
        a.cmp(r12, limit);
        a.jb(wait);

        if (cpus == 2)
        {
            // The AP still runs: its count moves within a while.
            var moved = a.CreateLabel();
            var spin = a.CreateLabel();
            a.mov(rdi, (long)ApMirror);
            a.mov(edx, __dword_ptr[rdi]);
            a.mov(rcx, 100_000_000);
            a.Label(ref spin);
            a.pause();
            a.cmp(edx, __dword_ptr[rdi]);
            a.jne(moved);
            a.dec(rcx);
            a.jnz(spin);
            Finish(a, puts, "ap stopped\n", ApStopped);
            a.Label(ref moved);
        }
        // Sum the region again.
        var sum = a.CreateLabel();
        var bad = a.CreateLabel();
        a.mov(rdi, (long)Region);
        a.mov(rcx, RegionPages * 512);
        a.xor(rdx, rdx);
        a.Label(ref sum);
        a.add(rdx, __qword_ptr[rdi]);
        a.add(rdi, 8);
        a.dec(rcx);
        a.jnz(sum);
        a.cmp(rdx, r13);
        a.jne(bad);
        Finish(a, puts, "sum ok\n", SumOk);
        a.Label(ref bad);
        Finish(a, puts, "sum bad\n", SumBad);

        // print: RAX as decimal, then '\n'. Keeps every register but RAX, RCX, RDX, RDI.
        a.Label(ref print);
        a.mov(rdi, rsp);
        a.sub(rsp, 32);
        a.dec(rdi);
        a.mov(__byte_ptr[rdi], (byte)'\n');
        a.mov(rcx, 10);
        var digit = a.CreateLabel();
        a.Label(ref digit);
        a.xor(edx, edx);
        a.div(rcx);
        a.add(dl, (byte)'0');
        a.dec(rdi);
        a.mov(__byte_ptr[rdi], dl);
        a.test(rax, rax);
        a.jnz(digit);
        a.call(puts);
        a.add(rsp, 32);
        a.ret();

        // puts: the bytes from RDI up to and including '\n' to COM1. Clobbers RAX, RDX, RDI.
        a.Label(ref puts);
        var next = a.CreateLabel();
        a.mov(dx, 0x3F8);
        a.Label(ref next);
        a.mov(al, __byte_ptr[rdi]);
        a.@out(dx, al);
        a.inc(rdi);
        a.cmp(al, (byte)'\n');
        a.jne(next);
        a.ret();

        a.Label(ref tick);
        InterruptCode.ReturnPastInterruptedHlt(a, hlt);
        a.push(rdi);
        a.mov(rdi, (long)Ticks);
        a.inc(__qword_ptr[rdi]);
        a.pop(rdi);
        InterruptCode.Eoi(a);
        a.iretq();

        if (cpus == 2)
        {
            a.Label(ref trampoline);
            a.db(ap);
        }
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    /// <summary>Prints <paramref name="text"/> and writes <paramref name="status"/> to the debug-exit port.</summary>
    private static void Finish(Assembler a, Label puts, string text, int status)
    {
        var message = a.CreateLabel();
        var after = a.CreateLabel();
        a.lea(rdi, __[message]);
        a.call(puts);
        a.mov(al, (byte)status);
        a.@out(0xF4, al);
        a.jmp(after);
        a.Label(ref message);
        a.db(System.Text.Encoding.ASCII.GetBytes(text));
        a.Label(ref after);
        a.hlt();
    }

    /// <summary>The AP's real-mode loop at <see cref="Trampoline"/>: EBX counts, stored at <see cref="ApMirror"/>.</summary>
    private static byte[] ApCode()
    {
        var a = new Assembler(16);
        var loop = a.CreateLabel();
        a.cli();
        a.mov(ax, (ushort)(ApMirror >> 4 & 0xF000));
        a.mov(ds, ax);
        a.xor(ebx, ebx);
        a.Label(ref loop);
        a.inc(ebx);
        a.mov(__dword_ptr[(int)(ApMirror & 0xFFFF)], ebx);
        a.pause();
        a.jmp(loop);
        return GuestCode.Assemble(a, Trampoline);
    }
}
