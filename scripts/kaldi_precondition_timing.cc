// Kaldi's own online NG preconditioners timed like scripts/bench_precondition.py
// (12 warm-up calls, then blocks of calls, a multiple of the update period;
// minimum over blocks of CPU time per call; each call copies the minibatch into
// a fixed buffer and preconditions it in place; inputs low rank plus noise).
// bench_precondition.py --kaldi BINARY runs it beside our implementation, so
// both are measured on the same machine at the same load.
//
// Build (outside this repository; Kaldi's sources are not part of it): with a
// Kaldi checkout at commit f4007661 (the golden vectors' one) in $K and Debian's
// libopenblas-dev and liblapacke-dev,
//   mkdir inc && cp /usr/include/lapack*.h inc/ && \
//     sed -i 's/^#define LAPACK_FORTRAN_STRLEN_END$//' inc/lapack.h   # Kaldi omits the strlen args
//   echo '#define KALDI_VERSION "f4007661"' > $K/src/base/version.h
//   FLAGS="-O2 -std=c++17 -DOPENFST_VER=10800 -DHAVE_CUDA=0 -DKALDI_DOUBLEPRECISION=0 \
//          -DHAVE_OPENBLAS -I$K/src -Iinc -I/usr/include/x86_64-linux-gnu/openblas-pthread"
//   for f in $K/src/{base,matrix,cudamatrix,util}/*.cc $K/src/nnet3/natural-gradient-online.cc \
//            $K/src/nnet3/nnet-parse.cc $K/src/nnet2/nnet-precondition-online.cc; do
//     case $f in *-test.cc|*numpy-array.cc) continue;; esac; g++ $FLAGS -c $f -o $(basename $f).o; done
//   g++ $FLAGS kaldi_precondition_timing.cc *.o -o kaldi_timing -lopenblas -llapacke -lpthread
//
// Usage: kaldi_timing N D rank period [blocks] [min_seconds]
// Prints "nnet2 N D rank period ms" and the same for nnet3.
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>
#include "nnet3/natural-gradient-online.h"
#include "nnet2/nnet-precondition-online.h"
using namespace kaldi;
static double cpu() { return double(std::clock()) / CLOCKS_PER_SEC; }
int main(int argc, char **argv) {
  int N = atoi(argv[1]), D = atoi(argv[2]), R = atoi(argv[3]), P = atoi(argv[4]);
  int blocks = argc > 5 ? atoi(argv[5]) : 7;
  double min_seconds = argc > 6 ? atof(argv[6]) : 0.15;
  std::mt19937 gen(0); std::normal_distribution<float> g;
  Matrix<BaseFloat> basis(30, D);
  for (int i = 0; i < 30; i++) for (int j = 0; j < D; j++) basis(i, j) = g(gen);
  std::vector<CuMatrix<BaseFloat> > batches;
  for (int b = 0; b < 8; b++) {
    Matrix<BaseFloat> a(N, 30), X(N, D);
    for (int i = 0; i < N; i++) for (int j = 0; j < 30; j++) a(i, j) = g(gen);
    X.AddMatMat(1.0, a, kNoTrans, basis, kNoTrans, 0.0);
    for (int i = 0; i < N; i++) for (int j = 0; j < D; j++) X(i, j) += 0.3 * g(gen);
    batches.push_back(CuMatrix<BaseFloat>(X));
  }
  CuMatrix<BaseFloat> buf(N, D);
  CuVector<BaseFloat> row_prod(N);
  for (int method = 0; method < 2; method++) {   // 0: nnet2, 1: nnet3
    nnet3::OnlineNaturalGradient p3; nnet2::OnlinePreconditioner p2;
    p3.SetRank(R); p3.SetUpdatePeriod(P); p3.SetNumSamplesHistory(2000); p3.SetAlpha(4.0);
    p2.SetRank(R); p2.SetUpdatePeriod(P); p2.SetNumSamplesHistory(2000); p2.SetAlpha(4.0);
    BaseFloat scale;
    auto call = [&](int i) {
      buf.CopyFromMat(batches[i % 8]);
      if (method == 0) p2.PreconditionDirections(&buf, &row_prod, &scale);
      else p3.PreconditionDirections(&buf, &scale);
    };
    for (int i = 0; i < 12; i++) call(i);
    double t0 = cpu(); for (int i = 0; i < 4 * P; i++) call(i);
    double per = (cpu() - t0) / (4 * P);
    int calls = P * std::max(1, int(min_seconds / per / P));
    double best = 1e9;
    for (int b = 0; b < blocks; b++) {
      double c0 = cpu();
      for (int i = 0; i < calls; i++) call(i);
      best = std::min(best, (cpu() - c0) / calls);
    }
    printf("%s %d %d %d %d %.4f\n", method == 0 ? "nnet2" : "nnet3", N, D, R, P, 1e3 * best);
  }
  return 0;
}
